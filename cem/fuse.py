"""Fuse: pool the expression and reasoner distributions, and check each cue against the measured AUs.

Pooling is log-linear (a weighted geometric mean, Genest & Zidek 1986):
``p(k) ∝ exp((w_e log p_expr(k) + w_r log p_reason(k)) / T)``, probabilities clipped at 1e-6. The weights
and temperature come from the config (fitted on labelled data by ``benchmarks/fit_fusion.py``).

Grounding of a cue with ``source == "face"``: its AU (given, or found from the cue's words by
``CUE_KEYWORDS``) is ``supported`` when the FER stage measured it present, ``contradicted`` when it
measured it clearly absent (intensity < 0.5), otherwise ``unverifiable``; also unverifiable when no AU can
be named or the mesh failed. Scene, body and text cues cannot be checked against the face:
``unverifiable``.

Explanation (:func:`explain`, run after pooling for every reasoner): the rationale a user reads names
the face's *final* ``top_emotion`` and the evidence for it (the cited or prototype AUs that are present,
other cues, the expression model's probability); a blend (the second label has at least
``BLEND_RATIO`` of the top one's mass) names both. Each cue gets a ``role``: ``for`` the answer's
label(s), ``against`` them (cited for them but measured absent), or ``alternative`` (for another label).
When the reasoner's own top label differs from the fused one, the rationale says so and why.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from cem.config import FusionConfig
from cem.contract import Cue, FaceEvidence
from cem.fer.aus import AU_NAMES

ABSENT_BELOW = 0.5
BLEND_RATIO = 1 / 3  # a second label with at least this share of the top one's mass makes a blend

# words in a free-text cue -> the AUs that would show it (first match wins; all listed AUs are checked)
CUE_KEYWORDS: list[tuple[str, tuple[str, ...]]] = [
    (r"smil|lip corners? (?:pulled )?up|grin", ("AU12",)),
    (r"cheeks? raised|crow'?s? feet|duchenne", ("AU06",)),
    (r"frown|furrow|brows? (?:lowered|drawn|knit)|scowl", ("AU04",)),
    (r"inner brows? raised", ("AU01",)),
    (r"raised (?:eye)?brows|(?:eye)?brows? raised", ("AU01", "AU02")),
    (r"wide(?:-| )?(?:open )?eyes|eyes wide|upper (?:eye)?lids? raised", ("AU05",)),
    (r"squint|narrowed eyes|eyelids? tightened", ("AU07",)),
    (r"nose wrinkl|wrinkled nose", ("AU09",)),
    (r"upper lip raised|sneer", ("AU10",)),
    (r"dimpl", ("AU14",)),
    (r"(?:lip )?corners? (?:pulled |turned )?down|downturned", ("AU15",)),
    (r"chin raised|pout", ("AU17",)),
    (r"lips? stretched", ("AU20",)),
    (r"lips? pressed|pressed lips", ("AU24",)),
    (r"lips? tightened|tight lips", ("AU23",)),
    (r"jaw drop|mouth (?:wide )?open|open mouth|gaping", ("AU26", "AU25")),
    (r"lips? part", ("AU25",)),
    (r"eyes? closed|closed eyes", ("AU43",)),
]


def expression_over(p_expression: dict[str, float], labels: list[str], label_map: dict[str, str]) -> np.ndarray:
    """The expression distribution over the configured labels, renormalised. A label that
    ``fusion.label_map`` maps takes the mapped label's probability (the FER stage gives labels the expression
    model lacks 0, so without a mapping such a label can hardly win); a label absent from ``p_expression``
    (a hand-built distribution) takes the mean probability (no information either way)."""
    mean = float(np.mean(list(p_expression.values()))) if p_expression else 1.0
    vals = []
    for k in labels:
        if label_map.get(k) in p_expression:
            vals.append(p_expression[label_map[k]])
        elif k in p_expression:
            vals.append(p_expression[k])
        else:
            vals.append(mean)
    v = np.clip(np.array(vals, dtype=float), 0, None)
    return v / v.sum() if v.sum() > 0 else np.full(len(labels), 1 / len(labels))


def pool(p_expression: dict[str, float], p_reasoner: dict[str, float] | None, labels: list[str],
         fusion: FusionConfig) -> dict[str, float]:
    """Log-linear pooling over ``labels``; with no reasoner distribution, the tempered expression one."""
    le = np.log(np.clip(expression_over(p_expression, labels, fusion.label_map), 1e-6, None))
    z = fusion.expression_weight * le
    if p_reasoner is not None:
        lr = np.log(np.clip([p_reasoner.get(k, 0.0) for k in labels], 1e-6, None))
        z = z + fusion.reasoner_weight * lr
    z = z / fusion.temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    return dict(zip(labels, p.tolist()))


def downweight_contradicted(dist: dict[str, float], cues: list[Cue], penalty: float) -> dict[str, float]:
    """Reduce each label's probability by ``penalty`` times the share of its supporting cue weight that the
    measured AUs contradict, then renormalise (``penalty`` 0 leaves the distribution unchanged)."""
    if penalty <= 0 or not cues:
        return dist
    total: dict[str, float] = {}
    bad: dict[str, float] = {}
    for c in cues:
        w = max(c.weight, 1e-3)
        total[c.supports] = total.get(c.supports, 0.0) + w
        if c.grounding == "contradicted":
            bad[c.supports] = bad.get(c.supports, 0.0) + w
    out = {k: v * (1.0 - min(1.0, penalty) * bad.get(k, 0.0) / total[k]) if k in total else v
           for k, v in dist.items()}
    s = sum(out.values())
    return {k: v / s for k, v in out.items()} if s > 0 else dist


def aus_for_cue(cue: Cue) -> tuple[str, ...]:
    if cue.au:
        return (cue.au,)
    text = cue.cue.lower()
    for pattern, aus in CUE_KEYWORDS:
        if re.search(pattern, text):
            return aus
    return ()


def ground(cue: Cue, face: FaceEvidence) -> str:
    if cue.source != "face" or not face.aus:
        return "unverifiable"
    aus = [a for a in aus_for_cue(cue) if a in face.aus]
    if not aus:
        return "unverifiable"
    if any(face.aus[a].present for a in aus):
        return "supported"
    if all(face.aus[a].intensity < ABSENT_BELOW for a in aus):
        return "contradicted"
    return "unverifiable"


def ground_cues(cues: list[Cue], face: FaceEvidence) -> list[Cue]:
    for c in cues:
        c.grounding = ground(c, face)  # type: ignore[assignment]
    return cues


def fit_fusion(p_expression: np.ndarray, p_reasoner: np.ndarray, p_human: np.ndarray,
               weights: np.ndarray | None = None, objective: str = "plurality") -> dict[str, Any]:
    """Fit ``reasoner_weight`` (grid 0..1.5 by 0.05, expression weight fixed at 1) and ``temperature``
    (golden-section on log T). ``objective="plurality"`` minimises the NLL of the plurality label (ties
    excluded; calibrates the top-1 confidence, as the expression model's temperature does);
    ``"distribution"`` minimises the cross-entropy to the human distributions. Arrays are (N, K) over the
    same labels. Returns the values for ``fusion:`` in a config and the loss they reach."""
    from cem.eval import plurality
    from cem.training import fit_temperature

    ph = np.asarray(p_human, float)
    ph = ph / ph.sum(1, keepdims=True)
    if objective == "plurality":
        y, keep = plurality(ph)
        ph = np.eye(ph.shape[1])[y[keep]]
        p_expression, p_reasoner = np.asarray(p_expression)[keep], np.asarray(p_reasoner)[keep]
    elif objective != "distribution":
        raise ValueError("objective must be 'plurality' or 'distribution'")
    le = np.log(np.clip(p_expression, 1e-6, None))
    lr = np.log(np.clip(p_reasoner, 1e-6, None))
    grid = np.round(np.arange(0.0, 1.51, 0.05), 2) if weights is None else np.asarray(weights, float)
    best: dict[str, Any] | None = None
    for w in grid:
        z = le + w * lr
        t = fit_temperature(z, ph)
        zz = z / t
        p = np.exp(zz - zz.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        ce = float(-(ph * np.log(np.clip(p, 1e-12, None))).sum(1).mean())
        if best is None or ce < best["cross_entropy"]:
            best = {"expression_weight": 1.0, "reasoner_weight": float(w), "temperature": float(t),
                    "cross_entropy": ce, "objective": objective}
    assert best is not None
    return best


# --------------------------------------------------------------------------------------------- explaining
def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _au_phrase(au: str, face: FaceEvidence) -> str:
    return f"{au} ({AU_NAMES.get(au, 'action unit')}, {face.aus[au].intensity:.1f})"


def _evidence_sentence(label: str, face: FaceEvidence, cues: list[Cue], p_expr: float) -> str:
    """What points to ``label``: present AUs its cues cite (else its prototype's present AUs), its other
    supporting cues, and the expression model's probability."""
    from cem.reasoning.rules import PROTOTYPES

    own = [c for c in cues if c.supports == label and c.role == "for"]
    aus: list[str] = []
    for c in own:
        for au in (aus_for_cue(c) if c.source == "face" else ()):
            if au in face.aus and face.aus[au].present and au not in aus:
                aus.append(au)
    if not aus:
        aus = [au for au, w in PROTOTYPES.get(label, {}).items() if w > 0 and au in face.aus and face.aus[au].present]
    others = [c.cue for c in own if c.source != "face" or not aus_for_cue(c)][:2]
    expr = f"the expression model gives {label} {p_expr:.2f}"
    if label == "neutral" and not aus:
        active = [au for au, a in sorted(face.aus.items(), key=lambda kv: -kv[1].intensity) if a.present][:3]
        moving = (f"only {_join([_au_phrase(a, face) for a in active])} {'is' if len(active) == 1 else 'are'} "
                  "active, matching no emotion's prototype" if active else "no action unit is active")
        s = f"For neutral, {moving}" if face.aus else "For neutral, no action units were measured (no face mesh)"
        s += f"; {expr}"
    elif aus:
        verb = "points" if len(aus) == 1 else "point"
        s = f"{_join([_au_phrase(a, face) for a in aus])} {verb} to {label}, and {expr}"
    elif not face.aus:
        s = f"No action units were measured (no face mesh), so for {label} {expr}"
    else:
        s = f"No measured action unit points to {label}; {expr}"
    if others:
        s += "; cues: " + _join([f"'{t}'" for t in others])
    return s + "."


def explain(face: FaceEvidence, emotion: dict[str, float], cues: list[Cue], p_reasoner: dict[str, float] | None,
            fusion: FusionConfig, reasoner_rationale: str = "", who: str = "the reasoner",
            reasoner_error: str | None = None, reasoner_answer: dict[str, float] | None = None) -> str:
    """The rationale of a face's final answer; sets each cue's ``role`` in place.

    ``emotion`` is the fused distribution, ``cues`` the grounded cues, ``p_reasoner`` the reasoner's own
    (contradiction-adjusted) distribution or None when it gave none, ``who`` names the reasoner in the
    text ("the model", "the AU prototypes"). The reasoner's own rationale, if any, follows, quoted, unless it
    plainly names other labels than the reasoner's own answer (``reasoner_answer``: its distribution as given,
    before any adjustment; default ``p_reasoner``)."""
    labels = list(emotion)
    ranked = sorted(labels, key=lambda k: -emotion[k])
    top = ranked[0]
    shown = [top]
    if len(ranked) > 1 and emotion[ranked[1]] >= BLEND_RATIO * emotion[top]:
        shown.append(ranked[1])
    for c in cues:
        if c.supports in shown:
            c.role = "against" if c.grounding == "contradicted" else "for"
        else:
            c.role = "alternative"
    p_expr = dict(zip(labels, expression_over(face.expression, labels, fusion.label_map).tolist()))
    if len(shown) == 2:
        head = f"A blend of {top} ({emotion[top]:.2f}) and {shown[1]} ({emotion[shown[1]]:.2f})."
    else:
        head = f"{top.capitalize()} ({emotion[top]:.2f})."
    parts = [head] + [_evidence_sentence(lab, face, cues, p_expr[lab]) for lab in shown]
    against = [c for c in cues if c.role == "against"]
    if against:
        cited = _join([c.au or f"'{c.cue}'" for c in against])
        parts.append(f"Against it: {cited}, cited for {_join(sorted({c.supports for c in against}))}, "
                     f"{'was' if len(against) == 1 else 'were'} measured absent.")
    if p_reasoner is None:
        why = f" ({reasoner_error})" if reasoner_error else ""
        parts.append(f"{who[0].upper() + who[1:]} gave no answer{why}, so this rests on the expression model alone.")
    else:
        own = max(p_reasoner, key=p_reasoner.__getitem__)
        if own != top:
            parts.append(
                f"{who[0].upper() + who[1:]} alone favoured {own} ({p_reasoner[own]:.2f}); pooled with the expression "
                f"model (weights {fusion.expression_weight:g} and {fusion.reasoner_weight:g}), which gives {top} "
                f"{p_expr[top]:.2f} and {own} {p_expr.get(own, 0.0):.2f}, the answer is {top}.")
    said = reasoner_rationale.strip()
    if said and p_reasoner is not None:  # a rejected answer's words are not quoted as if they stood
        answer = reasoner_answer or p_reasoner
        own = max(answer, key=answer.__getitem__)
        named = labels_named(said, labels)
        # the labels the model's own numbers stand behind: its top one and a blend partner (BLEND_RATIO). A
        # label is held against the answer when a word for what the person feels affirms it ("clearly
        # furious"), not a noun or a behaviour (STATE_WORDS)
        backed = {k for k, v in answer.items() if v >= BLEND_RATIO * answer[own]}
        unbacked = [k for k in labels_named(said, labels, STATE_WORDS) if k not in backed]
        if named and (own not in named or unbacked):
            # the model's words affirm labels its own numbers do not: quoting them would give the record two
            # answers ("smiling, yet clearly furious" for happiness 0.9; "no sign of fear" affirms nothing)
            what = f"not its answer ({own})" if own not in named else f"which its answer does not back ({own})"
            parts.append(f"{who[0].upper() + who[1:]}'s own rationale names {_join(unbacked or named)}, {what}, "
                         f"and is left out.")
        else:
            parts.append(f"{who[0].upper() + who[1:]} said: \"{said}\"")
    return " ".join(parts)


# a label word preceded in its clause by one of these is negated or contrasted, not affirmed
NEGATION = re.compile(r"\b(no|not|nor|without|never|lacks?|lacking|absence|absent|neither|free|rather|instead|"
                      r"unlike|except|hardly)\b|n't\b", re.I)
CLAUSE_BREAK = re.compile(r"[,;:.!?()]|\bbut\b|\bhowever\b|\bthough\b", re.I)


# the word forms by which a rationale names the FER+ labels (any other label: its own name)
LABEL_WORDS: dict[str, tuple[str, ...]] = {  # unambiguous words only ("calm", "upset", "mad" are not)
    "neutral": ("neutral", "expressionless"),
    "happiness": ("happiness", "happy", "joy", "joyful", "smile", "smiles", "smiling", "pleased", "cheerful",
                  "delighted", "laugh", "laughs", "laughing", "grin", "grins", "grinning", "beaming"),
    "surprise": ("surprise", "surprised", "shocked", "astonished", "amazed", "startled"),
    "sadness": ("sadness", "sad", "unhappy", "sorrow", "grief", "crying", "tearful", "tears"),
    "anger": ("anger", "angry", "furious", "rage", "annoyed", "irritated"),
    "disgust": ("disgust", "disgusted", "repulsed", "revolted"),
    "fear": ("fear", "afraid", "fearful", "scared", "frightened", "terrified"),
    "contempt": ("contempt", "contemptuous", "scornful", "disdain", "sneer", "sneering"),
}


# the words among those that say what a person feels (adjectives), not a situation ("a surprise party") or a
# behaviour that other feelings share ("smiling politely" when sad, "crying tears of joy", "smiling through
# clenched teeth"): a rationale may read behaviours against the answer, which is what context is for
STATE_WORDS: dict[str, tuple[str, ...]] = {
    "neutral": ("neutral", "expressionless"),
    "happiness": ("happy", "joyful", "pleased", "cheerful", "delighted"),
    "surprise": ("surprised", "shocked", "astonished", "amazed", "startled"),
    "sadness": ("sad", "unhappy"),
    "anger": ("angry", "furious", "annoyed", "irritated"),
    "disgust": ("disgusted", "repulsed", "revolted"),
    "fear": ("afraid", "fearful", "scared", "frightened", "terrified"),
    "contempt": ("contemptuous", "scornful"),
}


def labels_named(text: str, labels: list[str], words_of: dict[str, tuple[str, ...]] = LABEL_WORDS) -> list[str]:
    """The labels that ``text`` affirms: names (whole words, any case; the FER+ labels also by the words in
    ``words_of``, :data:`LABEL_WORDS` by default) at least once without a negation or contrast before it in the
    same clause ("no sign of fear or anger", "rather than angry" do not affirm them; "not happy, clearly angry"
    affirms anger)."""
    out = []
    for lab in labels:
        words = words_of.get(lab, (lab,))
        for m in re.finditer(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", text, re.I):
            clause = CLAUSE_BREAK.split(text[: m.start()])[-1]  # the words before it in its own clause
            if not NEGATION.search(clause):
                out.append(lab)
                break
    return out
