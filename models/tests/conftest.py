"""Shared fixtures: the reduced test configuration, built once per session."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinysam_export.build import BuildRequest, build
from tinysam_export.config import TEST
from tinysam_export.weights import synthetic_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def test_model():
    """Synthetic seed-0 model of the test configuration."""
    return synthetic_model(TEST, 0)


@pytest.fixture(scope="session")
def built_test_dir(tmp_path_factory) -> tuple[Path, dict]:
    """A full default build (FP32 + INT8, fidelity report) of the test configuration."""
    out = tmp_path_factory.mktemp("test_build")
    manifest = build(BuildRequest(cfg=TEST, out_dir=out, use_shared_images=False))
    return out, manifest


@pytest.fixture(scope="session")
def default_manifest() -> dict:
    """The committed full-size default model's manifest."""
    return json.loads((REPO / "models" / "default" / "manifest.json").read_text())
