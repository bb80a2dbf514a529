"""Regression checks on real labelled data from ../shared (skipped cleanly when it is absent).

Subsets keep these fast; the full numbers come from the benchmarks (see the README).
"""

from __future__ import annotations

import numpy as np
import pytest

from cem.datasets import load_ferplus, shared_data_dir

pytestmark = [pytest.mark.shared, pytest.mark.skipif(shared_data_dir() is None,
                                                     reason="../shared/data/ferplus not present")]


@pytest.fixture(scope="module")
def valid():
    return load_ferplus("valid")


def test_expression_model_on_ferplus_valid_subset(valid):
    from cem.eval import distribution_metrics
    from cem.fer.expression import ExpressionModel

    n = 1200
    m = ExpressionModel.from_pretrained()
    p = np.concatenate([m.predict(valid.pixels[i : i + 300]) for i in range(0, n, 300)])
    res = distribution_metrics(valid.distribution[:n], p)
    assert res["accuracy"] >= 0.83 and res["kl"] <= 0.5 and res["ece"] <= 0.06


def test_au12_separates_happiness_from_neutral(valid):
    import cv2

    from cem.eval import plurality, roc_auc
    from cem.fer.aus import estimate_aus
    from cem.fer.detect import FaceMesher
    from cem.fer.geometry import load_reference

    y, keep = plurality(valid.distribution)
    happy = np.flatnonzero(keep & (y == 1))[:150]
    neutral = np.flatnonzero(valid.votes[:, 0] >= 6)[:150]
    mesher, ref = FaceMesher(), load_reference()

    def au12(idx):
        out = []
        for i in idx:
            mesh = mesher.mesh_whole(cv2.cvtColor(valid.pixels[i], cv2.COLOR_GRAY2RGB))
            if mesh is not None:
                out.append(estimate_aus(mesh, ref)["AU12"].intensity)
        return np.array(out)

    assert roc_auc(au12(happy), au12(neutral)) >= 0.93
