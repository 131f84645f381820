"""Render a kustomization: with the real kustomize (``kubectl kustomize``) when this machine has
it, else with a small renderer for exactly the subset deploy/kubernetes uses (resources, images,
RFC 6902 patches with a target). The subset refuses any other field, so a new feature in the
manifests cannot be silently ignored; tests/deploy/test_kubernetes.py checks that both agree
wherever kubectl exists."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonpatch
import yaml

Obj = dict[str, Any]
_FIELDS = {"apiVersion", "kind", "resources", "images", "patches"}


def kubectl() -> str | None:
    """kubectl with kustomize v4 or newer (RFC 6902 ``patches`` with targets), or None."""
    exe = shutil.which("kubectl")
    if exe is None:
        return None
    out = subprocess.run([exe, "version", "--client"], check=False, capture_output=True,
                         text=True, timeout=30).stdout
    m = re.search(r"Kustomize Version: v(\d+)", out)
    return exe if m and int(m.group(1)) >= 4 else None


def render_real(path: Path) -> list[Obj]:
    exe = kubectl()
    assert exe is not None
    out = subprocess.run([exe, "kustomize", str(path)], check=True, capture_output=True,
                         text=True, timeout=60).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _matches(obj: Obj, target: dict[str, str]) -> bool:
    meta = obj.get("metadata", {})
    return all({"kind": obj.get("kind"), "name": meta.get("name"),
                "namespace": meta.get("namespace")}.get(k) == v for k, v in target.items())


def _containers(obj: Obj) -> list[Obj]:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def render_lite(path: Path) -> list[Obj]:
    k = yaml.safe_load((path / "kustomization.yaml").read_text())
    unknown = set(k) - _FIELDS
    if unknown:
        raise ValueError(f"{path}: kustomization fields outside the supported subset: {unknown}")
    objs: list[Obj] = []
    for res in k.get("resources", []):
        p = path / res
        objs += render_lite(p) if p.is_dir() else [d for d in yaml.safe_load_all(p.read_text())
                                                    if d]
    for patch in k.get("patches", []):
        ops = yaml.safe_load(patch["patch"] if "patch" in patch
                             else (path / patch["path"]).read_text())
        if not isinstance(ops, list):
            raise ValueError(f"{path}: only RFC 6902 (JSON) patches are supported")
        hits = [i for i, o in enumerate(objs) if _matches(o, patch["target"])]
        if not hits:
            raise ValueError(f"{path}: patch target {patch['target']} matches nothing")
        for i in hits:
            objs[i] = jsonpatch.apply_patch(objs[i], ops)
    for img in k.get("images", []):
        for obj in objs:
            for c in _containers(obj):
                name = re.split(r"[:@]", c["image"], maxsplit=1)[0]
                if name == img["name"]:
                    c["image"] = f"{img.get('newName', name)}:{img['newTag']}" \
                        if "newTag" in img else img.get("newName", name)
    return objs


def render(path: Path) -> list[Obj]:
    return render_real(path) if kubectl() else render_lite(path)
