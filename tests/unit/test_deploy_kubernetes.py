"""deploy/kubernetes (the Kustomize base and its cpu and gpu overlays) and deploy/kserve,
offline: each renders with `kubectl kustomize`; the core kinds pass kubernetes-validate's
strict schemas (unknown fields are errors) for the oldest and newest Kubernetes it knows;
the KServe kinds match KServe's own generated types; and what matters holds: non-root
(the image's uid), read-only root with a writable /tmp, probes, requests and limits, the
trainer and replica roles, the HPA and PDB on the serving replicas, GPUs in the gpu overlay,
and a runtime that serves /mnt/models over the v2 protocol."""

from __future__ import annotations

import copy
import re
from typing import Any

import kubernetes_validate
import pytest

from app.settings import Settings
from model.checkpoint import FORMAT_VERSION
from tests.helpers import kube
from tests.helpers.cli import REPO

DEPLOY = REPO / "deploy"
OVERLAYS = ("cpu", "gpu")
KSERVE_KINDS = {"ServingRuntime", "InferenceService"}
# Environment variables that name a place something writes (the root filesystem is not one)
WRITES_TO = ("HOME", "TMPDIR", "XDG_CACHE_HOME", "MPLCONFIGDIR", "TORCHINDUCTOR_CACHE_DIR",
             "TRITON_CACHE_DIR", "TORCH_HOME", "ALEXNET_HOME")  # fmt: skip

Doc = dict[str, Any]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Doc]]:
    try:
        return {name: kube.kustomize(DEPLOY / path) for name, path in [
            ("base", "kubernetes/base"), ("cpu", "kubernetes/overlays/cpu"),
            ("gpu", "kubernetes/overlays/gpu"), ("kserve", "kserve")]}  # fmt: skip
    except kube.Missing as exc:
        pytest.skip(str(exc))


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def deployments(docs: list[Doc]) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}


def pod_specs(docs: list[Doc]) -> list[tuple[str, Doc]]:
    """(name, pod spec) of every Deployment and ServingRuntime."""
    out = [(n, d["spec"]["template"]["spec"]) for n, d in deployments(docs).items()]
    out += [(d["metadata"]["name"], d["spec"]) for d in docs if d["kind"] == "ServingRuntime"]
    return out


def environment(docs: list[Doc], container: Doc) -> dict[str, Any]:
    """A container's environment: its config maps' data, then its own `env` (a value, or
    the `valueFrom` it names)."""
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        env.update(one(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in container.get("env", []):
        env[var["name"]] = var.get("value", var.get("valueFrom"))
    return env


def image_uid() -> int:
    dockerfile = (REPO / "Dockerfile").read_text()
    uid = re.search(r"useradd .*--uid (\d+)", dockerfile)
    user = re.search(r"^USER (\d+)", dockerfile, re.MULTILINE)
    assert uid and user and uid[1] == user[1], "the Dockerfile's user has a numeric uid"
    return int(uid[1])


# ----------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("overlay", ("base", *OVERLAYS))
def test_the_core_kinds_pass_the_strict_schemas(
    rendered: dict[str, list[Doc]], overlay: str
) -> None:
    docs = rendered[overlay]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["ServiceAccount", "ConfigMap", "PersistentVolumeClaim", "Service",
                            "Service", "Deployment", "Deployment", "HorizontalPodAutoscaler",
                            "PodDisruptionBudget"])  # fmt: skip
    assert not [d for d in docs if d["kind"] == "Secret"]  # no token in git, not even a fake
    for version in kube.k8s_versions():
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)


def test_the_kserve_kinds_match_kserves_types(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["kserve"]
    assert sorted(d["kind"] for d in docs) == sorted(KSERVE_KINDS)
    try:
        kube.kserve_models()
    except kube.Missing as exc:
        pytest.skip(str(exc))
    for version in kube.k8s_versions():
        for doc in docs:
            assert kube.check_kserve_resource(doc, version) == []


def test_the_checks_are_strict(rendered: dict[str, list[Doc]]) -> None:
    """A misspelt field fails each check (so passing them means something)."""
    deployment = copy.deepcopy(one(rendered["cpu"], "Deployment", "alexnet"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readonlyRootFilesystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kube.k8s_versions()[1], strict=True)
    try:
        kube.kserve_models()
    except kube.Missing as exc:
        pytest.skip(str(exc))
    version = kube.k8s_versions()[1]
    isvc = copy.deepcopy(one(rendered["kserve"], "InferenceService"))
    model = isvc["spec"]["predictor"]["model"]
    model["storageURI"] = model.pop("storageUri")
    del model["modelFormat"]
    model["minReplicas"] = "1"  # (a predictor's field, not a model's)
    isvc["spec"]["predictor"]["maxReplicas"] = "4"
    errors = kube.check_kserve_resource(isvc, version)
    at = "InferenceService.spec.predictor"
    assert f"{at}.model.storageURI: unknown field of V1beta1ModelSpec" in errors
    assert f"{at}.model.modelFormat: required by V1beta1ModelSpec" in errors
    assert f"{at}.model.minReplicas: unknown field of V1beta1ModelSpec" in errors
    assert f"{at}.maxReplicas: expected int, got '4'" in errors
    runtime = copy.deepcopy(one(rendered["kserve"], "ServingRuntime"))
    runtime["spec"]["containers"][0]["securityContext"]["readonlyRootFilesystem"] = True
    runtime["spec"]["protocolVersion"] = "v2"
    errors = kube.check_kserve_resource(runtime, version)
    typo = "ServingRuntime.spec.protocolVersion: unknown field of V1alpha1ServingRuntimeSpec"
    assert typo in errors
    assert any(e.startswith("ServingRuntime.spec.containers[0]") and "readonlyRootFilesystem" in e
               for e in errors), errors  # fmt: skip


# ----------------------------------------------------------------------------- properties


@pytest.mark.parametrize("overlay", (*OVERLAYS, "kserve"))
def test_every_container_is_non_root_with_a_read_only_root(
    rendered: dict[str, list[Doc]], overlay: str
) -> None:
    docs, uid = rendered[overlay], image_uid()
    for name, pod in pod_specs(docs):
        for c in pod["containers"]:
            sc = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] == uid, name
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, name
            assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}, name
            # What may be written: /tmp (an emptyDir) and ALEXNET_HOME's volume, only.
            volumes = {v["name"]: v for v in pod["volumes"]}
            mounts = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
            assert "emptyDir" in mounts["/tmp"], name
            env = environment(docs, c)
            for var in WRITES_TO:
                if var in env:
                    assert any(env[var] == m or env[var].startswith(m.rstrip("/") + "/")
                               for m in mounts), f"{name}: {var}={env[var]} is not writable"  # fmt: skip
            assert {"HOME", "TMPDIR", "MPLCONFIGDIR", "TORCHINDUCTOR_CACHE_DIR"} <= set(env)
        if overlay != "kserve":  # (KServe owns its pods' service account)
            assert pod["automountServiceAccountToken"] is False, name
            assert pod["enableServiceLinks"] is False, name  # no ALEXNET_PORT=tcp://...


@pytest.mark.parametrize("overlay", (*OVERLAYS, "kserve"))
def test_settings_are_real_and_valid(rendered: dict[str, list[Doc]], overlay: str) -> None:
    docs = rendered[overlay]
    for name, pod in pod_specs(docs):
        for c in pod["containers"]:
            env = environment(docs, c)
            fields = {k.removeprefix("ALEXNET_").lower(): v for k, v in env.items()
                      if k.startswith("ALEXNET_")}  # fmt: skip
            assert set(fields) <= set(Settings.model_fields), f"{name}: unknown ALEXNET_ setting"
            values = {k: v for k, v in fields.items() if isinstance(v, str) and "{{" not in v}
            s = Settings(_env_file=None, **values)  # type: ignore[call-arg]
            assert s.host == "0.0.0.0", name
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert s.port in ports.values(), name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_resources(rendered: dict[str, list[Doc]], overlay: str) -> None:
    for name, d in deployments(rendered[overlay]).items():
        (c,) = d["spec"]["template"]["spec"]["containers"]
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        start = c["startupProbe"]
        assert start["httpGet"]["path"] == "/healthz"
        # a first start may train the default model for minutes: liveness waits for it
        assert start["periodSeconds"] * start["failureThreshold"] >= 600, name
        ports = {p["name"] for p in c["ports"]}
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            assert c[probe]["httpGet"]["port"] in ports, (name, probe)
        res = c["resources"]
        for kind in ("cpu", "memory"):
            assert kind in res["requests"] and kind in res["limits"], (name, kind)


def test_kserve_probes_and_resources(rendered: dict[str, list[Doc]]) -> None:
    runtime = one(rendered["kserve"], "ServingRuntime")
    (c,) = runtime["spec"]["containers"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 8080}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8080}
    assert {"cpu", "memory"} <= set(c["resources"]["requests"]) & set(c["resources"]["limits"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_trainer_runs_jobs_and_the_replicas_follow_active(
    rendered: dict[str, list[Doc]], overlay: str
) -> None:
    docs = rendered[overlay]
    trainer, serving = deployments(docs)["alexnet-trainer"], deployments(docs)["alexnet"]
    t_env = environment(docs, trainer["spec"]["template"]["spec"]["containers"][0])
    s_env = environment(docs, serving["spec"]["template"]["spec"]["containers"][0])
    assert t_env["ALEXNET_RUN_JOBS"] == "true" and s_env["ALEXNET_RUN_JOBS"] == "false"
    assert trainer["spec"]["replicas"] == 1 and trainer["spec"]["strategy"]["type"] == "Recreate"
    assert "replicas" not in serving["spec"]  # the HPA's
    assert float(s_env["ALEXNET_WATCH_ACTIVE_S"]) > 0 and s_env["ALEXNET_BOOTSTRAP"] == "none"
    # the admin token: the trainer's, from a Secret the user creates; none on the replicas
    assert t_env["ALEXNET_ADMIN_TOKEN"] == {"secretKeyRef": {"name": "alexnet-admin",
                                                              "key": "token"}}  # fmt: skip
    assert "ALEXNET_ADMIN_TOKEN" not in s_env
    # one ReadWriteMany claim as ALEXNET_HOME for both
    pvc = one(docs, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for d, env in ((trainer, t_env), (serving, s_env)):
        pod = d["spec"]["template"]["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                  if "persistentVolumeClaim" in v}  # fmt: skip
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert claims[mounts[env["ALEXNET_HOME"]]] == pvc["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_hpa_and_pdb_select_the_right_pods(
    rendered: dict[str, list[Doc]], overlay: str
) -> None:
    docs = rendered[overlay]
    pods = {n: d["spec"]["template"]["metadata"]["labels"] for n, d in deployments(docs).items()}

    def selects(selector: dict[str, str]) -> set[str]:
        return {n for n, labels in pods.items() if selector.items() <= labels.items()}

    for name, d in deployments(docs).items():
        assert selects(d["spec"]["selector"]["matchLabels"]) == {name}
    assert selects(one(docs, "Service", "alexnet")["spec"]["selector"]) == {"alexnet"}
    trainer_svc = one(docs, "Service", "alexnet-trainer")
    assert selects(trainer_svc["spec"]["selector"]) == {"alexnet-trainer"}
    assert trainer_svc["spec"]["publishNotReadyAddresses"] is True  # the bootstrap's progress
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "alexnet"}  # fmt: skip
    assert hpa["spec"]["minReplicas"] >= 2
    pdb = one(docs, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"]) == {"alexnet"}


def test_the_gpu_overlay_asks_for_gpus(rendered: dict[str, list[Doc]]) -> None:
    for overlay, device in (("gpu", "cuda"), ("cpu", "cpu")):
        docs = rendered[overlay]
        for name, d in deployments(docs).items():
            (c,) = d["spec"]["template"]["spec"]["containers"]
            gpus = c["resources"]["limits"].get("nvidia.com/gpu")
            assert (gpus is not None and int(gpus) >= 1) == (overlay == "gpu"), name
            assert environment(docs, c)["ALEXNET_DEVICE"] == device, name
            assert c["image"].endswith(":cuda") == (overlay == "gpu"), name


def test_the_kserve_runtime_serves_mnt_models_over_v2(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["kserve"]
    runtime, isvc = one(docs, "ServingRuntime"), one(docs, "InferenceService")
    spec = runtime["spec"]
    assert spec["protocolVersions"] == ["v2"]
    formats = {(f["name"], f.get("version")) for f in spec["supportedModelFormats"]}
    assert ("alexnet", str(FORMAT_VERSION)) in formats
    (c,) = spec["containers"]
    assert c["name"] == "kserve-container"
    env = environment(docs, c)
    assert env["ALEXNET_MODEL_DIR"] == "/mnt/models"
    assert env["ALEXNET_MODEL_NAME"] == "{{.Name}}"  # /v2/models/<the InferenceService>
    assert env["ALEXNET_PORT"] == "8080" and c["ports"][0]["containerPort"] == 8080
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {name for name, _ in formats}
    assert model["protocolVersion"] == "v2" and model["storageUri"]


def test_the_docs_create_the_secret_the_trainer_reads(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["cpu"]
    trainer = deployments(docs)["alexnet-trainer"]["spec"]["template"]["spec"]["containers"][0]
    ref = environment(docs, trainer)["ALEXNET_ADMIN_TOKEN"]["secretKeyRef"]
    text = (REPO / "docs" / "kubernetes.md").read_text()
    assert f"create secret generic {ref['name']} --from-literal={ref['key']}=" in text


def test_the_kserve_runtime_sets_nothing_knative_refuses(rendered: dict[str, list[Doc]]) -> None:
    """KServe's default (Serverless) mode runs the runtime as a Knative Service, whose
    webhook masks container fields: `privileged` (even false) and env `valueFrom` field or
    resource references (behind flags, off by default) fail the deployment."""
    (c,) = one(rendered["kserve"], "ServingRuntime")["spec"]["containers"]
    assert "privileged" not in c.get("securityContext", {})
    for var in c.get("env", []):
        source = var.get("valueFrom", {})
        assert not {"fieldRef", "resourceFieldRef"} & set(source), var["name"]
    assert [p["containerPort"] for p in c["ports"]] == [8080]  # one port, which probes use
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] == 8080


# ----------------------------------------------------------------------------- training


def test_the_distributed_training_job_is_valid_and_meets_at_its_pod_0() -> None:
    """deploy/kubernetes/distributed-training: an indexed Job whose pods meet at pod 0
    through a headless Service, with `alexnet train` options our own CLI accepts."""
    from app.cli import build_parser
    from app.training import Launch

    try:
        docs = kube.kustomize(DEPLOY / "kubernetes/distributed-training")
    except kube.Missing as exc:
        pytest.skip(str(exc))
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "Job", "Service"]
    for version in kube.k8s_versions():
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)
    job, svc = one(docs, "Job"), one(docs, "Service")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"]
    assert pod["subdomain"] == svc["metadata"]["name"]
    assert svc["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    (container,) = pod["containers"]
    args = build_parser().parse_args(container["args"])
    launch = Launch.of(args)
    host, port = str(launch.rdzv_endpoint).rsplit(":", 1)
    assert host == f"{job['metadata']['name']}-0.{svc['metadata']['name']}"  # pod 0's name
    assert int(port) == svc["spec"]["ports"][0]["port"] == container["ports"][0]["containerPort"]
    assert int(launch.nnodes.split(":")[-1]) == spec["completions"]
    assert launch.max_restarts > 0 and args.checkpoint_every_steps
    # the run folder is on the shared volume, the service's ALEXNET_HOME
    env = environment(docs, container)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert (
        str(args.run_dir).startswith(mounts["home"] + "/") and env["ALEXNET_HOME"] == mounts["home"]
    )
    home = next(v for v in pod["volumes"] if v["name"] == "home")
    assert home["persistentVolumeClaim"]["claimName"] == "alexnet-home"
    assert pod["securityContext"]["runAsUser"] == image_uid()
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert env["TMPDIR"] == mounts["tmp"] == "/tmp"
