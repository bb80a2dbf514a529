"""Shared fixtures. Models load once per test session; no test touches the network."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


@pytest.fixture(scope="session")
def pipeline():
    import cem

    p = cem.Pipeline.from_config("default")
    yield p
    p.close()


@pytest.fixture(scope="session")
def face_crop(astronaut) -> np.ndarray:
    """The astronaut's head and shoulders (about 100 px face)."""
    return np.ascontiguousarray(astronaut[30:270, 110:350])


def yaw_turned(face: np.ndarray, k: float = 0.4) -> np.ndarray:
    """A perspective warp that compresses the right side of the image: the face looks turned."""
    import cv2

    h, w = face.shape[:2]
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    dst = np.float32([[0, h * k / 2], [w * (1 - k / 3), 0], [w * (1 - k / 3), h], [0, h * (1 - k / 2)]])
    m = cv2.getPerspectiveTransform(src, dst)
    return cv2.warpPerspective(face, m, (w, h), borderMode=cv2.BORDER_REPLICATE)


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    """A tiny random LLaVA built on the spot (no download); its text is noise, its plumbing is real."""
    pytest.importorskip("transformers")
    pytest.importorskip("xgrammar")
    from cem.testing import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


@pytest.fixture(scope="session")
def llm_pipeline(tiny_llava):
    import cem

    p = cem.Pipeline.from_config("default", reasoner="transformers", model=str(tiny_llava),
                                 reasoner__options={"local_files_only": True, "max_cues": 2,
                                                    "max_text_chars": 24})
    yield p
    p.close()


@pytest.fixture(scope="session")
def two_faces(astronaut) -> np.ndarray:
    import cv2

    canvas = np.full((300, 700, 3), 190, np.uint8)
    face = cv2.resize(np.ascontiguousarray(astronaut[30:270, 110:350]), (220, 220))
    canvas[40:260, 20:240] = face
    canvas[40:260, 420:640] = face[:, ::-1]
    return canvas


def full_sequence_label_probs(reasoner, job) -> np.ndarray:
    """The reference for a reasoner's shared-prefix label scoring: each "Face 1: <label>" scored as one
    full sequence (prompt + answer, no KV cache), softmax over the labels' summed log-probabilities."""
    import torch

    tok = reasoner.processor.tokenizer
    inputs = reasoner._inputs([job])
    stem = tok("Face 1:", add_special_tokens=False)["input_ids"]
    scores = []
    for lab in reasoner.labels:
        ids = tok(f"Face 1: {lab}", add_special_tokens=False)["input_ids"]
        k = next((i for i, (a, b) in enumerate(zip(ids, stem)) if a != b), min(len(ids), len(stem)))
        extra = torch.tensor([ids])
        full = dict(inputs)
        full["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
        full["attention_mask"] = torch.ones_like(full["input_ids"])
        if "mm_token_type_ids" in full:
            full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], dim=1)
        with torch.inference_mode():
            logits = reasoner.model(**full).logits
        logp = torch.log_softmax(logits[0].float(), -1)
        n0 = inputs["input_ids"].shape[1]
        scores.append(sum(float(logp[n0 + j - 1, ids[j]]) for j in range(k, len(ids))))
    s = np.array(scores)
    return np.exp(s - s.max()) / np.exp(s - s.max()).sum()
