from __future__ import annotations

import pytest

from tests.deploy.manifests import KUSTOMIZATIONS, render


@pytest.fixture(scope="session")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    """Every kustomization under deploy/kubernetes, rendered once: {"base": [...], "overlays/example": [...]}."""
    tmp = tmp_path_factory.mktemp("kustomize")
    return {name: render(tmp, name) for name in KUSTOMIZATIONS}


@pytest.fixture(scope="session")
def example(rendered) -> list[dict]:
    """The example overlay: what `kubectl apply -k deploy/kubernetes/overlays/example` would create."""
    from tests.deploy.manifests import OVERLAY

    return rendered[OVERLAY]
