"""Through the pipeline: rationales explain the final answer for every reasoner, and the context given is
kept in the record and declared used or unused."""

from __future__ import annotations

import logging

import pytest


def test_rules_record_keeps_context_and_says_it_was_not_used(pipeline, astronaut, caplog):
    pipeline._context_warned = False  # the session-wide pipeline may have warned in another test
    with caplog.at_level(logging.WARNING, logger="cem.pipeline"):
        a = pipeline.analyze(astronaut, context="at a funeral").to_dict()
        b = pipeline.analyze(astronaut, context="at a wedding").to_dict()
        c = pipeline.analyze(astronaut).to_dict()
    assert (a["context"], b["context"], c["context"]) == ("at a funeral", "at a wedding", None)
    assert not a["provenance"]["context_used"] and not c["provenance"]["context_used"]
    warned = [r for r in caplog.records if "cannot use context" in r.getMessage()]
    assert len(warned) == 1 and "rules" in warned[0].getMessage()  # once per pipeline, not per image
    assert a["faces"][0]["emotion"] == b["faces"][0]["emotion"]  # the rules reasoner ignores context


def test_analyze_many_records_carry_their_own_context(pipeline, astronaut):
    out = list(pipeline.analyze_many([astronaut, astronaut], contexts=["one", None]))
    assert [r.context for r in out] == ["one", None]


def test_rules_rationale_names_the_final_answer(pipeline, astronaut):
    face = pipeline.analyze(astronaut).to_dict()["faces"][0]
    assert face["rationale"].startswith(face["top_emotion"].capitalize())
    assert {c["role"] for c in face["cues"]} <= {"for", "alternative", "against"}
    assert all(c["role"] == "alternative" for c in face["cues"] if c["supports"] != face["top_emotion"]
               and c["supports"] not in face["rationale"])


@pytest.mark.slow
def test_llm_record_says_context_used_and_explains_the_fused_answer(llm_pipeline, astronaut):
    d = llm_pipeline.analyze(astronaut, context="at a funeral").to_dict()
    assert d["context"] == "at a funeral" and d["provenance"]["context_used"] is True
    assert llm_pipeline.analyze(astronaut).to_dict()["provenance"]["context_used"] is False  # none given
    from cem.fuse import BLEND_RATIO

    for f in d["faces"]:
        assert f["top_emotion"] in f["rationale"]
        e = f["emotion"]
        ranked = sorted(e, key=lambda k: -e[k])
        shown = ranked[:2] if e[ranked[1]] >= BLEND_RATIO * e[ranked[0]] else ranked[:1]
        assert all(lab in f["rationale"] for lab in shown)
        for c in f["cues"]:
            assert c["role"] == ("alternative" if c["supports"] not in shown else
                                 "against" if c["grounding"] == "contradicted" else "for")


def test_reasoners_implement_the_declared_protocol(pipeline):
    from cem.reasoning import Reasoner
    from cem.reasoning.llm import LLMReasonerBase

    r = pipeline.reasoner
    assert isinstance(r, Reasoner)
    assert (r.backend, r.uses_context, r.sampling, r.batch_size >= 1) == ("rules", False, None, True)
    members = [m for m in Reasoner.__annotations__] + ["reason_batch"]
    for m in members:  # the LLM base class declares every member the pipeline reads
        assert hasattr(LLMReasonerBase, m) or m in LLMReasonerBase.__init__.__code__.co_names, m
