"""Fusion, cue grounding and the evaluation metrics, against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cem import eval as ev
from cem.config import FusionConfig
from cem.fuse import ground, pool
from cem.reasoning.rules import RulesReasoner, prototype_matches
from cem.schema import ActionUnit, Cue, FaceEvidence, Quality

LABELS = ["neutral", "happiness", "sadness"]


def _face(**aus):
    return FaceEvidence(index=0, bbox=(0, 0, 10, 10), detection_score=1.0, pose=None,
                        quality=Quality(100, 0.1, False), expression={},
                        aus={k: ActionUnit(v, v >= 1.0) for k, v in aus.items()})


def test_pool_is_weighted_geometric_mean():
    pe = {"neutral": 0.5, "happiness": 0.25, "sadness": 0.25}
    pr = {"neutral": 0.25, "happiness": 0.5, "sadness": 0.25}
    p = pool(pe, pr, LABELS, FusionConfig(1.0, 1.0, 1.0))
    raw = np.array([0.5 * 0.25, 0.25 * 0.5, 0.25 * 0.25])
    assert np.allclose(list(p.values()), raw / raw.sum())
    assert pool(pe, None, LABELS, FusionConfig(1.0, 1.0, 1.0)) == pytest.approx(pe)
    sharp = pool(pe, None, LABELS, FusionConfig(1.0, 1.0, 0.5))
    assert sharp["neutral"] == pytest.approx(0.25 / (0.25 + 2 * 0.0625))


def test_grounding_supported_contradicted_unverifiable():
    face = _face(AU12=3.0, AU04=0.1, AU06=0.7)
    assert ground(Cue("broad smile", "face", "happiness", 1.0), face) == "supported"
    assert ground(Cue("furrowed brows", "face", "anger", 1.0), face) == "contradicted"
    assert ground(Cue("x", "face", "happiness", 1.0, au="AU06"), face) == "unverifiable"  # weak, not absent
    assert ground(Cue("wearing a black helmet", "face", "fear", 1.0), face) == "unverifiable"
    assert ground(Cue("a birthday cake", "scene", "happiness", 1.0), face) == "unverifiable"
    assert ground(Cue("smile", "face", "happiness", 1.0), _face()) == "unverifiable"  # no AUs measured


def test_rules_prototypes():
    m = prototype_matches({"AU06": 5.0, "AU12": 5.0}, ["neutral", "happiness", "sadness", "contempt"])
    assert m["happiness"] == 1.0 and m["sadness"] == 0.0 and m["contempt"] == 0.0
    r = RulesReasoner(["neutral", "happiness", "sadness"]).reason_face(_face(AU01=0.1, AU12=0.1))
    assert max(r.distribution, key=r.distribution.get) == "neutral" and r.cues == []
    empty = RulesReasoner(LABELS).reason_face(_face())
    assert np.allclose(list(empty.distribution.values()), 1 / 3)


def test_metrics_by_hand():
    h = np.array([[0.6, 0.4, 0.0], [0.0, 0.5, 0.5], [0.1, 0.1, 0.8]])  # row 2 is a tie
    m = np.array([[0.5, 0.5, 0.0], [0.2, 0.2, 0.6], [0.2, 0.2, 0.6]])
    y, keep = ev.plurality(h)
    assert keep.tolist() == [True, False, True] and y[keep].tolist() == [0, 2]
    assert ev.accuracy(h, m) == 1.0  # row 1: argmax(m)=0 (first of the tie) == 0
    mc = np.clip(m, 1e-6, None)
    mc = mc / mc.sum(1, keepdims=True)  # model probabilities clipped at 1e-6 and renormalised
    kl0 = 0.6 * math.log(0.6 / mc[0, 0]) + 0.4 * math.log(0.4 / mc[0, 1])
    kl1 = 0.5 * math.log(0.5 / mc[1, 1]) + 0.5 * math.log(0.5 / mc[1, 2])
    kl2 = sum(a * math.log(a / b) for a, b in zip(h[2], mc[2]))
    assert ev.kl_divergence(h, m) == pytest.approx((kl0 + kl1 + kl2) / 3, rel=1e-6)
    assert ev.nll(h, m) == pytest.approx(-(math.log(mc[0, 0]) + math.log(mc[2, 2])) / 2, rel=1e-6)
    assert ev.brier(h, m) == pytest.approx(((0.5 - 1) ** 2 + 0.25 + (0.04 + 0.04 + 0.16)) / 2)
    a = (h[0] + m[0]) / 2
    js0 = 0.5 * sum(p * math.log2(p / q) for p, q in zip(h[0], a) if p) + 0.5 * sum(
        p * math.log2(p / q) for p, q in zip(m[0], a) if p)
    assert ev.js_divergence(h[:1], m[:1]) == pytest.approx(js0)
    # ECE: confidences 0.5 (correct) and 0.6 (correct) fall in different bins: (0.5*0.5 + 0.5*0.4)
    assert ev.expected_calibration_error(h, m) == pytest.approx(0.5 * 0.5 + 0.5 * 0.4)
    assert ev.macro_f1(h, m) == 1.0
    assert ev.confusion_matrix(h, m, 3).tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 1]]
    assert ev.roc_auc(np.array([3.0, 2.0]), np.array([1.0, 2.0])) == pytest.approx(0.875)


def test_contradicted_support_is_downweighted():
    from cem.fuse import downweight_contradicted

    dist = {"neutral": 0.2, "happiness": 0.4, "sadness": 0.4}
    cues = [Cue("smile", "face", "happiness", 1.0, grounding="supported"),
            Cue("frown", "face", "sadness", 1.0, grounding="contradicted"),
            Cue("rain", "scene", "sadness", 1.0, grounding="unverifiable")]
    out = downweight_contradicted(dist, cues, 0.5)
    raw = {"neutral": 0.2, "happiness": 0.4, "sadness": 0.4 * (1 - 0.5 * 0.5)}
    s = sum(raw.values())
    assert out == pytest.approx({k: v / s for k, v in raw.items()})
    assert downweight_contradicted(dist, cues, 0.0) == dist


def test_reasoner_labels_beyond_the_expression_models_are_pooled():
    labels = ["neutral", "happiness", "pride"]
    pe = {"neutral": 0.2, "happiness": 0.8}
    pr = {"neutral": 0.2, "happiness": 0.3, "pride": 0.5}
    fused = pool(pe, pr, labels, FusionConfig(1.0, 1.0, 1.0, label_map={"pride": "happiness"}))
    raw = np.array([0.2 / 1.8 * 0.2, 0.8 / 1.8 * 0.3, 0.8 / 1.8 * 0.5])
    assert list(fused.values()) == pytest.approx(list(raw / raw.sum()))
    unmapped = pool(pe, pr, labels, FusionConfig(1.0, 1.0, 1.0))  # pride gets the mean (uninformative)
    raw = np.array([0.2 / 1.5 * 0.2, 0.8 / 1.5 * 0.3, 0.5 / 1.5 * 0.5])
    assert list(unmapped.values()) == pytest.approx(list(raw / raw.sum()))


def test_fit_fusion_recovers_known_weights():
    from cem.fuse import fit_fusion

    rng = np.random.default_rng(0)
    le, lr = rng.normal(0, 1.5, (3000, 4)), rng.normal(0, 1.5, (3000, 4))
    pe = np.exp(le) / np.exp(le).sum(1, keepdims=True)
    prr = np.exp(lr) / np.exp(lr).sum(1, keepdims=True)
    z = (np.log(pe) + 0.5 * np.log(prr)) / 1.5
    human = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    fit = fit_fusion(pe, prr, human, objective="distribution")
    assert fit["reasoner_weight"] == pytest.approx(0.5, abs=0.051)
    assert fit["temperature"] == pytest.approx(1.5, rel=0.05)


# ------------------------------------------------------------------------------------------- rationales
FER8 = ["neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt"]


def _explained(face, p_reasoner, cues, fusion, labels=FER8, **kw):
    from cem.fuse import explain, ground_cues

    cues = ground_cues(cues, face)
    emotion = pool(face.expression, p_reasoner, labels, fusion)
    return emotion, cues, explain(face, emotion, cues, p_reasoner, fusion, **kw)


def _random_face(rng):
    from cem.fer.aus import AU_NAMES

    aus = {au: ActionUnit(float(v), bool(v >= 1.0)) for au, v in zip(AU_NAMES, rng.uniform(0, 5, len(AU_NAMES)))
           if rng.random() < 0.4}
    e = rng.dirichlet(np.full(len(FER8), 0.3))
    return FaceEvidence(index=0, bbox=(0, 0, 10, 10), detection_score=1.0, pose=None,
                        quality=Quality(100, 0.1, False), expression=dict(zip(FER8, e.tolist())), aus=aus)


def test_rules_rationale_names_the_final_answer_on_synthetic_faces():
    """The property the rationale benchmark measures, on 400 random faces and fusion weights: the rationale
    names the fused top emotion (both labels of a blend); cue roles follow the answer."""
    from cem.fuse import BLEND_RATIO

    rng = np.random.default_rng(0)
    rules = RulesReasoner(FER8)
    for _ in range(400):
        face = _random_face(rng)
        r = rules.reason_face(face)
        fusion = FusionConfig(1.0, float(rng.choice([0.1, 1.0, 3.0])), 1.0)
        emotion, cues, text = _explained(face, r.distribution, r.cues, fusion, who="the AU prototypes")
        ranked = sorted(emotion, key=lambda k: -emotion[k])
        assert ranked[0] in text
        blend = emotion[ranked[1]] >= BLEND_RATIO * emotion[ranked[0]]
        if blend:
            assert ranked[1] in text and text.startswith("A blend of")
        shown = ranked[:2] if blend else ranked[:1]
        for c in cues:
            assert c.role == ("alternative" if c.supports not in shown else
                              "against" if c.grounding == "contradicted" else "for")
        own = max(r.distribution, key=r.distribution.get)
        assert ("alone favoured" in text) == (own != ranked[0])


def test_rationale_text_cites_evidence_with_grammar():
    """The issue's example: AU10 present, answer surprise; the rationale explains surprise, marks the
    disgust cue as an alternative and says why the AU prototypes' own answer lost."""
    face = _face(AU01=3.0, AU02=2.5, AU05=2.0, AU26=4.0, AU10=3.5)
    face.expression = {k: (0.95 if k == "surprise" else 0.05 / 7) for k in FER8}
    pr = {k: 0.02 for k in FER8} | {"disgust": 0.6, "surprise": 0.26}
    cues = [Cue("upper lip raised", "face", "disgust", 0.7, au="AU10"),
            Cue("jaw dropped", "face", "surprise", 0.8, au="AU26")]
    emotion, cues, text = _explained(face, pr, cues, FusionConfig(1.0, 0.1, 1.0), who="the AU prototypes")
    assert max(emotion, key=emotion.get) == "surprise"
    assert text.startswith("Surprise (")
    assert "AU26 (jaw drop, 4.0) points to surprise" in text
    assert "the expression model gives surprise 0.95" in text
    assert "The AU prototypes alone favoured disgust (0.60)" in text
    assert [c.role for c in cues] == ["alternative", "for"]


def test_rationale_of_a_blend_and_of_contradicted_cues():
    face = _face(AU06=2.0, AU12=3.0, AU04=0.1)
    face.expression = {k: 0.0 for k in FER8} | {"happiness": 0.55, "surprise": 0.45}
    pr = {k: 0.05 for k in FER8} | {"happiness": 0.4, "surprise": 0.3}
    cues = [Cue("smiling", "face", "happiness", 0.8), Cue("brows lowered", "face", "surprise", 0.5, au="AU04"),
            Cue("a birthday cake", "scene", "happiness", 0.6), Cue("tears", "face", "sadness", 0.3)]
    emotion, cues, text = _explained(face, pr, cues, FusionConfig(1.0, 1.0, 1.0), reasoner_rationale="She smiles.",
                                     who="the model")
    assert text.startswith("A blend of happiness") and "and surprise (" in text
    assert "AU12 (lip corner puller, 3.0) points to happiness" in text and "'a birthday cake'" in text
    assert "Against it: AU04, cited for surprise, was measured absent." in text
    assert text.endswith('The model said: "She smiles."')
    assert [c.role for c in cues] == ["for", "against", "for", "alternative"]


def test_rationale_when_the_reasoner_failed_or_no_mesh():
    face = _face()
    face.expression = {k: 0.01 for k in FER8} | {"sadness": 0.93}
    emotion, _, text = _explained(face, None, [], FusionConfig(), reasoner_error="reasoner failed (timeout): x")
    assert text.startswith("Sadness (") and "no action units were measured" in text.lower()
    assert "gave no answer (reasoner failed (timeout): x), so this rests on the expression model alone" in text
