"""The committed Rust fixtures are reproducible from the code."""

from __future__ import annotations

import json

import numpy as np

from conftest import REPO
from tinysam_export.fixtures import write_fixtures


def test_fixtures_reproduce(tmp_path):
    write_fixtures(tmp_path)
    committed = REPO / "tests" / "fixtures" / "golden"
    for name in ["preprocessed.npy", "embedding.fp32.npy", "embedding.int8.npy", "masks.fp32.npy", "masks.int8.npy",
                 "iou.fp32.npy", "iou.int8.npy"]:
        a, b = np.load(tmp_path / "golden" / name), np.load(committed / name)
        assert a.shape == b.shape, name
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=name)
    assert json.loads((tmp_path / "golden" / "cases.json").read_text()) == json.loads((committed / "cases.json").read_text())
