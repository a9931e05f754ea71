"""The Kubernetes manifests in k8s/: every overlay renders, every object is valid against the
real API schemas, and every command they run is accepted by the project's own CLIs.

Rendering uses the real `kubectl kustomize` (configs/ lies outside k8s/, hence
`--load-restrictor LoadRestrictionsNone`). Core kinds are checked with kubernetes-validate
(strict), custom resources against the openAPIV3Schema of the operators' CRDs vendored in
k8s/crds/ (defaults applied first and unknown fields rejected, as the API server does; the
CRDs' CEL rules are evaluated by the Python twins in CEL_RULES). Pod and Job templates
embedded in custom resources are validated as core objects too.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
CRDS = K8S / "crds"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
STAGES = ("platform", "build-shards", "pretrain", "finetune", "pretrain-jobset", "finetune-jobset")
KUBERNETES_VERSION = "1.33"  # Kubeflow Trainer v2 needs >= 1.31
CORE_GROUPS = {"", "apps", "batch", "policy", "rbac.authorization.k8s.io", "networking.k8s.io"}
SECRET_NAME = "dino-s3"
TRAINER_MASTER_PORT = "29400"  # what the Trainer's torch policy sets as PET_MASTER_PORT
MIN_GRACE_SECONDS = 120


# ---------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------


def kubectl() -> str:
    exe = shutil.which("kubectl")
    if exe is None:
        pytest.skip("kubectl not on PATH: it renders the kustomizations (kubectl kustomize)")
    return exe


@cache
def render(path: str) -> tuple[dict, ...]:
    proc = subprocess.run(
        [kubectl(), "kustomize", "--load-restrictor", "LoadRestrictionsNone", path],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def build(overlay: str, stage: str) -> tuple[dict, ...]:
    return render(str(K8S / "overlays" / overlay / stage))


def all_builds() -> list[tuple[str, str]]:
    return [(o, s) for o in OVERLAYS for s in STAGES]


def group_of(obj: dict) -> str:
    api = obj["apiVersion"]
    return api.split("/")[0] if "/" in api else ""


def by_kind(objs, kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def one(objs, kind: str, name: str | None = None) -> dict:
    found = [o for o in by_kind(objs, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


# ---------------------------------------------------------------------------------------
# CRD schemas -> JSON Schema, with API-server defaulting and CEL rules
# ---------------------------------------------------------------------------------------

_SCALAR_KEYWORDS = (
    "type", "enum", "pattern", "minimum", "maximum", "minLength", "maxLength", "minItems",
    "maxItems", "format", "required", "minProperties", "maxProperties", "multipleOf",
)


def to_json_schema(node: dict) -> dict:
    """A structural OpenAPI v3 schema as JSON Schema: unknown fields rejected unless the
    schema preserves them, `nullable` as a null type, int-or-string as anyOf."""
    out: dict[str, Any] = {k: node[k] for k in _SCALAR_KEYWORDS if k in node}
    out.pop("format", None)  # int32/int64/byte/date-time: not JSON Schema formats that matter here
    for key in ("exclusiveMinimum", "exclusiveMaximum"):
        if node.get(key) is True:  # OpenAPI 3.0 boolean form
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            out[key] = out.pop(bound)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node and key not in out:
            out[key] = [to_json_schema(s) for s in node[key]]
    if "not" in node:
        out["not"] = to_json_schema(node["not"])
    if "properties" in node:
        out["properties"] = {k: to_json_schema(v) for k, v in node["properties"].items()}
    if "additionalProperties" in node:
        extra = node["additionalProperties"]
        out["additionalProperties"] = to_json_schema(extra) if isinstance(extra, dict) else extra
    elif node.get("type") == "object" and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if "items" in node:
        out["items"] = to_json_schema(node["items"])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def _norm(rule: str) -> str:
    return " ".join(rule.split())


def _mlpolicy_one_of(s: dict) -> bool:
    return sum(k in s for k in ("torch", "mpi", "jax", "xgboost", "flux")) <= 1


def _no_inorder_with_depends_on(s: dict) -> bool:
    in_order = s.get("startupPolicy", {}).get("startupPolicyOrder") == "InOrder"
    return not (in_order and any("dependsOn" in rj for rj in s.get("replicatedJobs", [])))


NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://.+$")

# Python twins of the CEL rules (x-kubernetes-validations) of the vendored CRDs; a rule met
# on a field our objects set and missing here fails the test, so none goes unchecked.
CEL_RULES: dict[str, Callable[[Any], bool]] = {
    _norm(k): v for k, v in {
        "!(has(self.startupPolicy) && self.startupPolicy.startupPolicyOrder == 'InOrder' && "
        "self.replicatedJobs.exists(x, has(x.dependsOn)))": _no_inorder_with_depends_on,
        "self.templates.all(t, !has(t.metadata.namespace) || size(t.metadata.namespace) == 0)":
            lambda s: all(not t.get("metadata", {}).get("namespace") for t in s.get("templates", [])),
        "[has(self.torch), has(self.mpi), has(self.jax), has(self.xgboost),has(self.flux)]"
        ".filter(x, x).size() <= 1": _mlpolicy_one_of,
        "self >= 1": lambda s: s >= 1,
        "!self.exists(c, c == 'node')": lambda s: "node" not in s,
        "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')":
            lambda s: bool(NAME_RE.match(s["metadata"]["name"])),
        "size(self.metadata.name) <= 63": lambda s: len(s["metadata"]["name"]) <= 63,
        "self == '' || self.matches('^[A-Za-z][A-Za-z0-9+.-]*://.+$')":
            lambda s: s == "" or bool(URI_RE.match(s)),
        "self in ['trainer.kubeflow.org/trainjob-controller', 'kueue.x-k8s.io/multikueue']":
            lambda s: s in ("trainer.kubeflow.org/trainjob-controller", "kueue.x-k8s.io/multikueue"),
        "self in ['ray.io/kuberay-operator', 'kueue.x-k8s.io/multikueue']":
            lambda s: s in ("ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"),
    }.items()
}


def apply_defaults_and_rules(obj: Any, schema: dict, path: str, errors: list[str]) -> Any:
    """Fill schema defaults (as the API server does before validating), drop nulls, check
    list-map key uniqueness and evaluate CEL rules; returns the defaulted object."""
    for rule in schema.get("x-kubernetes-validations", []):
        if "oldSelf" in rule["rule"]:
            continue  # transition rules need a previous object
        check = CEL_RULES.get(_norm(rule["rule"]))
        if check is None:
            errors.append(f"{path}: CEL rule without a Python twin: {rule['rule']}")
        elif not check(obj):
            errors.append(f"{path}: violates {rule['rule']!r}: {rule.get('message', '')}")
    if isinstance(obj, dict):
        obj = {k: v for k, v in obj.items() if v is not None}
        props = schema.get("properties", {})
        for key, sub in props.items():
            if key not in obj and "default" in sub:
                obj[key] = copy.deepcopy(sub["default"])
        for key, value in list(obj.items()):
            sub = props.get(key)
            if sub is None and isinstance(schema.get("additionalProperties"), dict):
                sub = schema["additionalProperties"]
            if sub is not None:
                obj[key] = apply_defaults_and_rules(value, sub, f"{path}.{key}", errors)
    elif isinstance(obj, list) and "items" in schema:
        obj = [apply_defaults_and_rules(v, schema["items"], f"{path}[{i}]", errors)
               for i, v in enumerate(obj)]
        list_type = schema.get("x-kubernetes-list-type")
        if list_type == "map":
            keys = [tuple(item.get(k) for k in schema["x-kubernetes-list-map-keys"]) for item in obj]
            if len(keys) != len(set(keys)):
                errors.append(f"{path}: duplicate list-map keys {keys}")
        elif list_type == "set" and len({json.dumps(v, sort_keys=True) for v in obj}) != len(obj):
            errors.append(f"{path}: duplicate items in a set")
    return obj


YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253},
        "namespace": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
    },
    "additionalProperties": False,
}


@dataclass
class CrdVersion:
    schema: dict
    json_schema: dict


@cache
def crd_versions() -> dict[tuple[str, str, str], CrdVersion]:
    """(group, version, kind) -> schema, for every CRD file in k8s/crds/."""
    out = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=YAML_LOADER)
        for version in crd["spec"]["versions"]:
            schema = version["schema"]["openAPIV3Schema"]
            json_schema = to_json_schema(schema)
            json_schema["properties"]["metadata"] = OBJECT_META  # the API server's own type
            out[(crd["spec"]["group"], version["name"], crd["spec"]["names"]["kind"])] = CrdVersion(
                schema, json_schema)
    return out


def validate_custom(obj: dict) -> list[str]:
    group, version = obj["apiVersion"].split("/")
    crd = crd_versions().get((group, version, obj["kind"]))
    if crd is None:
        return [f"no CRD for {obj['apiVersion']} {obj['kind']} in {CRDS}"]
    errors: list[str] = []
    defaulted = apply_defaults_and_rules(obj, crd.schema, obj["kind"], errors)
    validator = jsonschema.Draft202012Validator(crd.json_schema)
    for err in validator.iter_errors(defaulted):
        errors.append(f"{'.'.join(map(str, err.absolute_path))}: {err.message[:300]}")
    return errors


def validate_core(obj: dict) -> None:
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


# PrometheusRule's CRD is not vendored: its (small) schema is checked here.
DURATION_RE = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")


def validate_prometheus_rule(obj: dict) -> list[str]:
    errors = []
    spec = obj.get("spec", {})
    if set(spec) - {"groups"}:
        errors.append(f"unknown spec fields {set(spec) - {'groups'}}")
    names = [g.get("name") for g in spec.get("groups", [])]
    if not names or len(names) != len(set(names)) or not all(names):
        errors.append(f"groups need unique non-empty names: {names}")
    for group in spec.get("groups", []):
        unknown = set(group) - {"name", "interval", "rules", "labels", "limit", "query_offset",
                                "partial_response_strategy"}
        if unknown:
            errors.append(f"group {group.get('name')}: unknown fields {unknown}")
        for rule in group.get("rules", []):
            unknown = set(rule) - {"alert", "record", "expr", "for", "keep_firing_for", "labels",
                                   "annotations"}
            if unknown:
                errors.append(f"rule {rule}: unknown fields {unknown}")
            if ("alert" in rule) == ("record" in rule):
                errors.append(f"rule {rule}: exactly one of alert/record")
            if not isinstance(rule.get("expr"), (str, int)) or rule.get("expr") == "":
                errors.append(f"rule {rule.get('alert')}: expr missing")
            for key in ("for", "keep_firing_for"):
                if key in rule and not DURATION_RE.match(rule[key]):
                    errors.append(f"rule {rule.get('alert')}: bad duration {key}={rule[key]}")
            for key in ("labels", "annotations"):
                if not all(isinstance(v, str) for v in rule.get(key, {}).values()):
                    errors.append(f"rule {rule.get('alert')}: {key} values must be strings")
    return errors


# ---------------------------------------------------------------------------------------
# walking pod templates
# ---------------------------------------------------------------------------------------


@dataclass
class PodTemplate:
    where: str
    template: dict  # {"metadata": ..., "spec": PodSpec}
    job_spec: dict | None = None  # the batch/v1 JobSpec around it, when there is one


def pod_templates(obj: dict) -> Iterator[PodTemplate]:
    kind, name = obj["kind"], obj["metadata"]["name"]
    spec = obj.get("spec", {})
    if kind == "JobSet":
        for rj in spec["replicatedJobs"]:
            yield PodTemplate(f"{kind}/{name}/{rj['name']}", rj["template"]["spec"]["template"],
                              rj["template"]["spec"])
    elif kind == "TrainingRuntime":
        for rj in spec["template"]["spec"]["replicatedJobs"]:
            yield PodTemplate(f"{kind}/{name}/{rj['name']}", rj["template"]["spec"]["template"],
                              rj["template"]["spec"])
    elif kind == "RayJob":
        cluster = spec["rayClusterSpec"]
        yield PodTemplate(f"{kind}/{name}/head", cluster["headGroupSpec"]["template"])
        for group in cluster["workerGroupSpecs"]:
            yield PodTemplate(f"{kind}/{name}/{group['groupName']}", group["template"])
        if "submitterPodTemplate" in spec:
            yield PodTemplate(f"{kind}/{name}/submitter", spec["submitterPodTemplate"])
    elif kind in ("Job",):
        yield PodTemplate(f"{kind}/{name}", spec["template"], spec)


def containers(template: dict) -> list[dict]:
    spec = template["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def trainer_container(template: dict) -> dict:
    return next(c for c in template["spec"]["containers"] if c["name"] == "node")


# ---------------------------------------------------------------------------------------
# schema validation of every object
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay,stage", all_builds())
def test_every_object_is_valid(overlay: str, stage: str) -> None:
    objs = build(overlay, stage)
    assert objs, f"{overlay}/{stage} renders nothing"
    for obj in objs:
        where = f"{overlay}/{stage}: {obj['kind']}/{obj['metadata']['name']}"
        assert obj["metadata"].get("namespace"), f"{where}: no namespace"
        if group_of(obj) in CORE_GROUPS:
            try:
                validate_core(obj)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{where}: {exc}")
        elif obj["kind"] == "PrometheusRule":
            assert not validate_prometheus_rule(obj), f"{where}: {validate_prometheus_rule(obj)}"
        else:
            errors = validate_custom(obj)
            assert not errors, f"{where}:\n" + "\n".join(errors[:20])
        # templates embedded in custom resources are core objects too
        for tpl in pod_templates(obj):
            if tpl.job_spec is not None:
                job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "t"},
                       "spec": tpl.job_spec}
                try:
                    validate_core(job)
                except kubernetes_validate.ValidationError as exc:
                    pytest.fail(f"{where} {tpl.where} (as a Job): {exc}")
            pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                   "template": tpl.template}
            try:
                validate_core(pod)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{where} {tpl.where} (as a PodTemplate): {exc}")


def test_validators_reject_bad_objects() -> None:
    """The checks above can fail: unknown fields, wrong types and CEL violations are caught."""
    trainjob = copy.deepcopy(one(build("gpu-cluster", "pretrain"), "TrainJob"))
    assert not validate_custom(trainjob)
    typo = copy.deepcopy(trainjob)
    typo["spec"]["trainer"]["numNode"] = 8
    assert any("numNode" in e for e in validate_custom(typo))
    wrong_type = copy.deepcopy(trainjob)
    wrong_type["spec"]["trainer"]["numNodes"] = "eight"
    assert validate_custom(wrong_type)
    bad_name = copy.deepcopy(trainjob)
    bad_name["metadata"]["name"] = "Dino_Pretrain"
    assert any("matches" in e for e in validate_custom(bad_name))
    runtime = copy.deepcopy(one(build("gpu-cluster", "pretrain"), "TrainingRuntime"))
    runtime["spec"]["mlPolicy"]["mpi"] = {"numProcPerNode": 1}
    assert any("size() <= 1" in e for e in validate_custom(runtime))
    jobset = copy.deepcopy(one(build("gpu-cluster", "pretrain-jobset"), "JobSet"))
    jobset["spec"]["failurePolicy"]["rules"][0]["action"] = "RestartEverything"
    assert validate_custom(jobset)
    pvc = copy.deepcopy(one(build("gpu-cluster", "platform"), "PersistentVolumeClaim"))
    pvc["spec"]["accesModes"] = ["ReadWriteMany"]
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_core(pvc)
    rule = copy.deepcopy(one(build("gpu-cluster", "platform"), "PrometheusRule"))
    rule["spec"]["groups"][0]["rules"][0]["for"] = "15 minutes"
    assert validate_prometheus_rule(rule)


# ---------------------------------------------------------------------------------------
# names, images, namespaces, configs
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay,stage", all_builds())
def test_references_resolve(overlay: str, stage: str) -> None:
    """Generated ConfigMap names (hash suffix) reach the custom resources, images are the
    overlay's, and every referenced ConfigMap/PVC/ServiceAccount is in the build or platform."""
    objs = build(overlay, stage)
    platform = build(overlay, "platform")
    names = {(o["kind"], o["metadata"]["name"]) for o in objs + platform}
    namespaces = {o["metadata"]["namespace"] for o in objs + platform}
    assert len(namespaces) == 1, f"{overlay}: objects spread over namespaces {namespaces}"
    for obj in objs:
        if obj["kind"] == "TrainJob":
            assert ("TrainingRuntime", obj["spec"]["runtimeRef"]["name"]) in names
            assert "/" in obj["spec"]["trainer"]["image"], "TrainJob image not set by the overlay"
        for tpl in pod_templates(obj):
            spec = tpl.template["spec"]
            if "serviceAccountName" in spec:
                assert ("ServiceAccount", spec["serviceAccountName"]) in names
            for vol in spec.get("volumes", []):
                for src in vol.get("projected", {}).get("sources", []):
                    if "configMap" in src:
                        assert ("ConfigMap", src["configMap"]["name"]) in names, (tpl.where, src)
                if "configMap" in vol:
                    assert ("ConfigMap", vol["configMap"]["name"]) in names, (tpl.where, vol)
                if "persistentVolumeClaim" in vol:
                    claim = vol["persistentVolumeClaim"]["claimName"]
                    assert ("PersistentVolumeClaim", claim) in names, (tpl.where, claim)
            mounts = {m["name"] for c in containers(tpl.template) for m in c.get("volumeMounts", [])}
            assert mounts <= {v["name"] for v in spec.get("volumes", [])}, tpl.where
            for c in containers(tpl.template):
                assert not c["image"].startswith("dino-scale-"), (
                    f"{tpl.where}: placeholder image {c['image']} not replaced by the overlay")
                ports = [p.get("name") for p in c.get("ports", []) if p.get("name")]
                assert len(ports) == len(set(ports)), f"{tpl.where}: duplicate port names"
                assert all(len(p) <= 15 for p in ports), f"{tpl.where}: port name too long {ports}"
                env = [e["name"] for e in c.get("env", [])]
                assert len(env) == len(set(env)), f"{tpl.where}: duplicate env {env}"


def mounted_configs(template: dict, configmaps: dict[str, dict], root: Path) -> dict[str, Path]:
    """Materialise the pod's ConfigMap volumes under `root` as the kubelet would; returns
    mountPath -> local directory."""
    out = {}
    spec = template["spec"]
    for mount in trainer_container(template).get("volumeMounts", []):
        vol = next(v for v in spec["volumes"] if v["name"] == mount["name"])
        sources = [s["configMap"] for s in vol.get("projected", {}).get("sources", []) if "configMap" in s]
        if "configMap" in vol:
            sources.append(vol["configMap"])
        if not sources:
            continue
        local = root / mount["name"]
        for src in sources:
            data = configmaps[src["name"]]["data"]
            items = src.get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                assert item["key"] in data, f"ConfigMap {src['name']} has no key {item['key']}"
                target = local / item["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(data[item["key"]])
        out[mount["mountPath"]] = local
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmap_holds_the_repository_configs(overlay: str) -> None:
    cm = next(o for o in build(overlay, "pretrain") if o["metadata"]["name"].startswith("dino-configs-"))
    assert cm["data"], "empty configs ConfigMap"
    for key, text in cm["data"].items():
        source = REPO / "configs" / key.replace("_base_.", "_base_/", 1)
        assert source.is_file(), f"ConfigMap key {key} has no file {source}"
        assert text == source.read_text(), f"ConfigMap key {key} differs from {source}"


# ---------------------------------------------------------------------------------------
# the commands: launcher flags, entry-point parsers, configs
# ---------------------------------------------------------------------------------------

VAR_RE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion in command/args (unknown references stay as they are)."""
    return VAR_RE.sub(lambda m: env.get(m.group(1), m.group(0)), value.replace("$$", "\0")).replace("\0", "$")


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cache
def node_launcher():
    return load_module(K8S / "scripts" / "deepspeed_node.py", "deepspeed_node")


def entry_point_parser(script: str):
    """The `build_parser()` of a launch/ script or a `python -m` module; a missing one fails."""
    if script.endswith(".py"):
        path = REPO / script
        assert path.is_file(), f"the manifests run {script}, which does not exist"
        module = load_module(path, "entry_" + path.stem)
    else:
        module = importlib.import_module(script)
    assert hasattr(module, "build_parser"), f"{script} has no build_parser()"
    assert hasattr(module, "main"), f"{script} has no main()"
    return module.build_parser()


@dataclass
class TrainingRun:
    """One training workload as every node of it would run it."""

    where: str
    template: dict  # pod template (the Trainer's runtime template for TrainJobs)
    container: dict  # the node container, with a TrainJob's trainer fields applied
    num_nodes: int
    node_envs: list[dict[str, str]]  # per node rank: the variables used in the command


def env_values(container: dict, annotations: dict[str, str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = expand(item["value"], env)
        elif "fieldRef" in item.get("valueFrom", {}):
            path = item["valueFrom"]["fieldRef"]["fieldPath"]
            match = re.fullmatch(r"metadata\.annotations\['([^']+)'\]", path)
            assert match, f"unsupported fieldPath {path}"
            env[item["name"]] = annotations[match.group(1)]
    return env


def training_runs(objs) -> list[TrainingRun]:
    runs = []
    runtimes = {o["metadata"]["name"]: o for o in by_kind(objs, "TrainingRuntime")}
    for job in by_kind(objs, "TrainJob"):
        name = job["metadata"]["name"]
        runtime = runtimes[job["spec"]["runtimeRef"]["name"]]
        assert "torch" in runtime["spec"]["mlPolicy"], "the PET_* variables come from the torch policy"
        node_rj = next(rj for rj in runtime["spec"]["template"]["spec"]["replicatedJobs"]
                       if rj["template"]["metadata"]["labels"].get(
                           "trainer.kubeflow.org/trainjob-ancestor-step") == "trainer")
        template = node_rj["template"]["spec"]["template"]
        trainer = job["spec"]["trainer"]
        container = copy.deepcopy(trainer_container(template))
        for key in ("image", "command", "args"):
            if key in trainer:
                container[key] = trainer[key]
        if "resourcesPerNode" in trainer:
            container["resources"] = trainer["resourcesPerNode"]
        container["env"] = container.get("env", []) + trainer.get("env", [])
        nodes = trainer.get("numNodes", runtime["spec"]["mlPolicy"].get("numNodes", 1))
        nproc = trainer["numProcPerNode"]
        envs = []
        for rank in range(nodes):
            env = env_values(container, {})
            env.update(PET_NNODES=str(nodes), PET_NPROC_PER_NODE=str(nproc), PET_NODE_RANK=str(rank),
                       PET_MASTER_ADDR=f"{name}-{node_rj['name']}-0-0.{name}",
                       PET_MASTER_PORT=TRAINER_MASTER_PORT)
            envs.append(env)
        runs.append(TrainingRun(f"TrainJob/{name}", template, container, nodes, envs))
    for jobset in by_kind(objs, "JobSet"):
        name = jobset["metadata"]["name"]
        coordinator = jobset["spec"]["coordinator"]
        (rj,) = jobset["spec"]["replicatedJobs"]
        assert rj["replicas"] == 1 and coordinator["replicatedJob"] == rj["name"]
        job = rj["template"]["spec"]
        assert job["completionMode"] == "Indexed"
        assert job["parallelism"] == job["completions"], f"JobSet/{name}: parallelism != completions"
        subdomain = jobset["spec"].get("network", {}).get("subdomain", name)
        master = (f"{name}-{coordinator['replicatedJob']}-{coordinator['jobIndex']}-"
                  f"{coordinator['podIndex']}.{subdomain}")
        container = trainer_container(job["template"])
        envs = [env_values(container, {"batch.kubernetes.io/job-completion-index": str(rank),
                                       "jobset.sigs.k8s.io/coordinator": master})
                for rank in range(job["completions"])]
        runs.append(TrainingRun(f"JobSet/{name}", job["template"], container, job["completions"], envs))
    return runs


def gpus(resources: dict, which: str) -> int:
    return int(resources.get(which, {}).get("nvidia.com/gpu", 0))


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("stage", ["pretrain", "finetune", "pretrain-jobset", "finetune-jobset"])
def test_training_commands_match_the_clis(overlay: str, stage: str, tmp_path: Path) -> None:
    """Every node's command: deepspeed's own parser accepts the launcher flags (with the
    node rank and master address each pod gets), the entry point's parser accepts the
    rest, the config (as mounted from the ConfigMap) loads with the overrides, and the
    sizes agree with the resources and metrics ports; the preflight runs first with the
    same arguments."""
    from dino_scale.config import load_config
    from dino_scale.preflight.__main__ import build_parser as preflight_parser

    objs = build(overlay, stage)
    configmaps = {o["metadata"]["name"]: o for o in by_kind(objs, "ConfigMap")}
    (run,) = training_runs(objs)
    spec = run.template["spec"]
    pvc_volumes = {v["name"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
    pvc_mounts = [m["mountPath"] for m in run.container["volumeMounts"] if m["name"] in pvc_volumes]
    assert pvc_mounts, f"{run.where}: no PVC mounted for checkpoints"
    mounts = mounted_configs(run.template, configmaps, tmp_path)
    assert run.container["command"] == ["python", "k8s/scripts/deepspeed_node.py"], run.where
    launcher = node_launcher()
    seen_ranks = set()
    for rank, env in enumerate(run.node_envs):
        argv = [expand(a, env) for a in run.container["args"]]
        unresolved = [a for a in argv if VAR_RE.search(a)]
        assert not unresolved, f"{run.where}: unresolved variables {unresolved}"
        ds = launcher.check_command(argv)  # deepspeed.launcher.runner.parse_args + our checks
        assert ds.num_nodes == run.num_nodes, f"{run.where}: --num_nodes {ds.num_nodes} != {run.num_nodes} pods"
        assert ds.node_rank == rank
        assert ds.master_addr and ds.master_port > 0
        assert ds.hostfile.startswith("/tmp/"), "the hostfile goes to the writable /tmp volume"
        seen_ranks.add(ds.node_rank)
        parser = entry_point_parser(ds.user_script)
        args = parser.parse_args(ds.user_args)
        # the pod's first step: the preflight, same arguments, the job's world size
        preflight = launcher.preflight_command(ds)
        assert preflight is not None and preflight[1:3] == ["-m", "dino_scale.preflight"], run.where
        checked = preflight_parser().parse_intermixed_args(preflight[3:])
        assert checked.world_size == run.num_nodes * ds.num_gpus, run.where
        assert (checked.config, checked.overrides, checked.pretrained) == (
            args.config, args.overrides, getattr(args, "pretrained", None)), run.where
        config_path = Path(args.config)
        mount = next((m for m in mounts if str(config_path).startswith(m + "/")), None)
        assert mount is not None, f"{run.where}: --config {config_path} is not on a ConfigMap volume"
        local_config = mounts[mount] / config_path.relative_to(mount)
        cfg = load_config(local_config, args.overrides)
        assert any(cfg.paths.output_dir.startswith(m + "/") for m in pvc_mounts), (
            f"{run.where}: paths.output_dir {cfg.paths.output_dir} is not on the checkpoint PVC; "
            "a restarted pod would not find its checkpoints")
        checkpoint_dir = cfg.paths.checkpoint_dir or cfg.paths.output_dir
        assert any(checkpoint_dir.startswith(m + "/") for m in pvc_mounts), (
            f"{run.where}: checkpoints ({checkpoint_dir}) are not on the PVC")
        assert cfg.train.auto_resume, f"{run.where}: restarts rely on train.auto_resume"
        if getattr(args, "pretrained", None):
            assert any(args.pretrained.startswith(m + "/") for m in pvc_mounts), args.pretrained
    assert seen_ranks == set(range(run.num_nodes))

    # sizes: ranks per node = GPUs requested = metrics ports declared
    nproc = ds.num_gpus
    res = run.container["resources"]
    if gpus(res, "limits") or gpus(res, "requests"):
        assert gpus(res, "limits") == gpus(res, "requests") == nproc, (
            f"{run.where}: {nproc} ranks per node but GPUs {res}")
    assert cfg.metrics.enabled and cfg.metrics.bind_address == "0.0.0.0", (
        f"{run.where}: metrics must listen on all interfaces for Prometheus")
    declared = {p["name"]: p["containerPort"] for c in spec["containers"]
                for p in c.get("ports", []) if p.get("name", "").startswith("metrics-rank")}
    assert declared == {f"metrics-rank{i}": cfg.metrics.base_port + i for i in range(nproc)}, (
        f"{run.where}: metrics ports {declared} do not match {nproc} ranks from {cfg.metrics.base_port}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_stages_chain_through_their_outputs(overlay: str, tmp_path: Path) -> None:
    """Shards land where training reads them, and fine-tuning starts from the weights the
    pretraining run exports (<output_dir>/export/model.safetensors)."""
    from dino_scale.config import load_config

    shard_outputs = set()
    for job in by_kind(build(overlay, "build-shards"), "RayJob"):
        argv = shlex.split(job["spec"]["entrypoint"])
        assert argv[:3] == ["python", "-m", "data_pipeline.build_shards"], argv
        args = entry_point_parser("data_pipeline.build_shards").parse_args(argv[3:])
        assert args.ray_address == "auto", f"RayJob/{job['metadata']['name']} must join its cluster"
        shard_outputs.add(args.output.rstrip("/"))

    def resolved(stage: str):
        objs = build(overlay, stage)
        configmaps = {o["metadata"]["name"]: o for o in by_kind(objs, "ConfigMap")}
        (run,) = training_runs(objs)
        mounts = mounted_configs(run.template, configmaps, tmp_path / stage)
        ds = node_launcher().check_command([expand(a, run.node_envs[0]) for a in run.container["args"]])
        args = entry_point_parser(ds.user_script).parse_args(ds.user_args)
        mount = next(m for m in mounts if args.config.startswith(m + "/"))
        return args, load_config(mounts[mount] / Path(args.config).relative_to(mount), args.overrides)

    for pre, fine in (("pretrain", "finetune"), ("pretrain-jobset", "finetune-jobset")):
        _, pre_cfg = resolved(pre)
        fine_args, fine_cfg = resolved(fine)
        for cfg in (pre_cfg, fine_cfg):
            assert cfg.data.train_shards.rstrip("/") in shard_outputs, (
                f"{overlay}: training reads {cfg.data.train_shards}, no RayJob writes it ({shard_outputs})")
        assert fine_args.pretrained == str(Path(pre_cfg.paths.output_dir) / "export" / "model.safetensors")
        assert pre_cfg.paths.output_dir != fine_cfg.paths.output_dir


# ---------------------------------------------------------------------------------------
# restarts, termination, cleanup
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("stage", ["pretrain", "finetune", "pretrain-jobset", "finetune-jobset"])
def test_failures_restart_the_whole_run(overlay: str, stage: str) -> None:
    objs = build(overlay, stage)
    jobset_specs = [o["spec"] for o in by_kind(objs, "JobSet")]
    jobset_specs += [o["spec"]["template"]["spec"] for o in by_kind(objs, "TrainingRuntime")]
    assert jobset_specs
    for spec in jobset_specs:
        policy = spec["failurePolicy"]
        assert policy["maxRestarts"] >= 1
        rule = next(r for r in policy["rules"] if r["action"] == "RestartJobSetAndIgnoreMaxRestarts")
        assert rule["onJobFailureReasons"] == ["PodFailurePolicy"]
        for rj in spec["replicatedJobs"]:
            job = rj["template"]["spec"]
            pod = job["template"]["spec"]
            assert job["backoffLimit"] == 0, "one failed pod restarts all nodes, not just itself"
            assert pod["restartPolicy"] == "Never"
            (disruption,) = [r for r in job["podFailurePolicy"]["rules"]
                             if any(c["type"] == "DisruptionTarget" for c in r.get("onPodConditions", []))]
            assert disruption["action"] == "FailJob"
            assert pod["terminationGracePeriodSeconds"] >= MIN_GRACE_SECONDS, (
                "too short for the SIGTERM checkpoint")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_clusters_are_cleaned_up(overlay: str) -> None:
    jobs = by_kind(build(overlay, "build-shards"), "RayJob")
    assert jobs
    for job in jobs:
        spec = job["spec"]
        assert spec["shutdownAfterJobFinishes"] is True
        assert 0 <= spec["ttlSecondsAfterFinished"] <= 3600
        assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"
        head = spec["rayClusterSpec"]["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0", "the head runs the driver, not tasks"


# ---------------------------------------------------------------------------------------
# security
# ---------------------------------------------------------------------------------------

QUANTITY_RE = re.compile(r"^([0-9.]+)(m|k|M|G|T|P|Ki|Mi|Gi|Ti|Pi)?$")
SUFFIX = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}


def quantity(value: Any) -> float:
    match = QUANTITY_RE.match(str(value))
    assert match, f"bad quantity {value}"
    return float(match.group(1)) * SUFFIX[match.group(2)]


def check_resources(where: str, resources: dict) -> None:
    for which in ("requests", "limits"):
        for res in ("cpu", "memory"):
            assert res in resources.get(which, {}), f"{where}: no {which}.{res}"
    for res, limit in resources["limits"].items():
        request = resources["requests"].get(res, limit)
        assert quantity(request) <= quantity(limit), f"{where}: {res} request {request} > limit {limit}"


@pytest.mark.parametrize("overlay,stage", all_builds())
def test_pods_are_locked_down(overlay: str, stage: str) -> None:
    for obj in build(overlay, stage):
        if obj["kind"] == "TrainJob":
            check_resources(f"TrainJob/{obj['metadata']['name']}", obj["spec"]["trainer"]["resourcesPerNode"])
        for tpl in pod_templates(obj):
            spec = tpl.template["spec"]
            pod_sc = spec.get("securityContext", {})
            assert pod_sc.get("runAsNonRoot") is True, f"{tpl.where}: runAsNonRoot"
            assert pod_sc.get("runAsUser", 1000) != 0
            assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", tpl.where
            assert spec.get("automountServiceAccountToken") is False, f"{tpl.where}: token mounted"
            assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
            assert not any("hostPath" in v for v in spec.get("volumes", [])), tpl.where
            for c in containers(tpl.template):
                where = f"{tpl.where}/{c['name']}"
                sc = c.get("securityContext", {})
                assert sc.get("allowPrivilegeEscalation") is False, f"{where}: privilege escalation"
                assert sc.get("readOnlyRootFilesystem") is True, f"{where}: writable root filesystem"
                assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities"
                assert not sc.get("privileged"), where
                check_resources(where, c.get("resources", {}))
                # writable places a read-only root needs
                mounted = {m["mountPath"] for m in c.get("volumeMounts", [])}
                assert "/tmp" in mounted, f"{where}: no writable /tmp"
                home = next((e["value"] for e in c.get("env", []) if e["name"] == "HOME"), None)
                assert home and home.startswith("/tmp/"), f"{where}: HOME must be writable"
            for vol in spec.get("volumes", []):
                if vol["name"] == "shm":
                    assert vol["emptyDir"]["medium"] == "Memory" and "sizeLimit" in vol["emptyDir"]


# ---------------------------------------------------------------------------------------
# secrets
# ---------------------------------------------------------------------------------------

SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret key": re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "credential assignment": re.compile(
        r"(?i)(secret|password|passwd|token|access_key)[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9/+]{12,}"),
    "credentials in a URL": re.compile(r"[a-z0-9+]+://[^/\s:@]+:[^/\s@]+@"),
}


def find_secrets(text: str) -> list[str]:
    return [f"{name}: {m.group(0)[:12]}..." for name, rx in SECRET_PATTERNS.items()
            for m in rx.finditer(text)]


def test_secret_scanner_finds_planted_keys() -> None:
    assert find_secrets("key: AKIAIOSFODNN7EXAMPLE")
    assert find_secrets("value: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    assert find_secrets("endpoint: https://user:hunter2@minio:9000")
    assert find_secrets("aws_secret_access_key = abcdefghijklmnopqrst")
    assert not find_secrets("secretKeyRef:\n  name: dino-s3\n  key: AWS_SECRET_ACCESS_KEY")


@pytest.mark.parametrize("overlay,stage", all_builds())
def test_no_secret_values(overlay: str, stage: str) -> None:
    objs = build(overlay, stage)
    assert not by_kind(objs, "Secret"), "Secrets are created by the cluster admin, never shipped"
    text = yaml.safe_dump_all(objs)
    assert not find_secrets(text), find_secrets(text)
    for obj in objs:
        for tpl in pod_templates(obj):
            for c in containers(tpl.template):
                for e in c.get("env", []):
                    if e["name"].startswith("AWS_") and e["name"] != "AWS_DEFAULT_REGION":
                        ref = e.get("valueFrom", {}).get("secretKeyRef")
                        assert ref and ref["name"] == SECRET_NAME, (
                            f"{tpl.where}: {e['name']} must come from Secret {SECRET_NAME}")
                for src in c.get("envFrom", []):
                    assert "secretRef" not in src or src["secretRef"]["name"] == SECRET_NAME


def test_no_secret_values_in_sources() -> None:
    for path in sorted(K8S.rglob("*")):
        if path.is_file() and CRDS not in path.parents and path.suffix in (".yaml", ".json", ".py", ""):
            assert not find_secrets(path.read_text()), (path, find_secrets(path.read_text()))


# ---------------------------------------------------------------------------------------
# metrics: scraping, alerts, dashboard
# ---------------------------------------------------------------------------------------

TARGET_LABELS = {"namespace", "pod", "container", "instance", "job", "endpoint", "run",
                 "node_rank", "local_rank"}


@cache
def trainer_metrics() -> dict[str, set[str]]:
    """Sample name -> label names, for every series the trainer exports (read from the
    registry of dino_scale.metrics.TrainingMetrics)."""
    from prometheus_client.metrics import MetricWrapperBase

    from dino_scale.config import MetricsConfig
    from dino_scale.metrics import TrainingMetrics

    metrics = TrainingMetrics(MetricsConfig(enabled=False), rank=0, local_rank=0)
    registered = {family.name for family in metrics.registry.collect()}
    out: dict[str, set[str]] = {}
    for collector in vars(metrics).values():
        if not isinstance(collector, MetricWrapperBase):
            continue
        for family in collector.describe():
            assert family.name in registered, f"{family.name} is not in the trainer's registry"
            labels = set(collector._labelnames)
            if family.type == "counter":
                out[family.name + "_total"] = labels
            elif family.type == "histogram":
                out[family.name + "_bucket"] = labels | {"le"}
                out[family.name + "_sum"] = labels
                out[family.name + "_count"] = labels
            else:
                out[family.name] = labels
    assert out, "dino_scale.metrics registers no metric"
    return out


SELECTOR_RE = re.compile(r"\b(dino_[a-zA-Z0-9_]+)\s*(\{([^}]*)\})?")
BY_RE = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
MATCHER_RE = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)")


def check_promql(expr: str, where: str) -> int:
    """Every dino_* series named in `expr` is exported, with the labels used on it."""
    exported = trainer_metrics()
    used = 0
    for match in SELECTOR_RE.finditer(expr):
        name, matchers = match.group(1), match.group(3) or ""
        assert name in exported, f"{where}: {name} is not exported by dino_scale.metrics ({sorted(exported)})"
        for label in MATCHER_RE.findall(matchers):
            assert label[0] in exported[name] | TARGET_LABELS, f"{where}: {name} has no label {label[0]}"
        used += 1
    all_labels = set().union(*exported.values()) | TARGET_LABELS
    for group in BY_RE.findall(expr):
        for label in filter(None, (s.strip() for s in group.split(","))):
            assert label in all_labels, f"{where}: grouping by unknown label {label}"
    return used


def test_promql_check_catches_unknown_metrics() -> None:
    with pytest.raises(AssertionError):
        check_promql("rate(dino_train_steps_total[5m])", "probe")
    with pytest.raises(AssertionError):
        check_promql('dino_loss{phase="train"}', "probe")
    assert check_promql('avg by (term) (dino_loss{run="x", term="loss"})', "probe") == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_alerts_cover_stalls_and_nan_skips(overlay: str) -> None:
    rules = [r for g in one(build(overlay, "platform"), "PrometheusRule")["spec"]["groups"] for r in g["rules"]]
    exprs = {r["alert"]: str(r["expr"]) for r in rules}
    for alert, expr in exprs.items():
        check_promql(expr, f"alert {alert}")
    assert any("increase(dino_steps_total" in e and "== 0" in e for e in exprs.values()), "no stall alert"
    assert any("dino_skipped_steps_total" in e for e in exprs.values()), "no NaN-skip alert"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dashboard_queries_exported_metrics(overlay: str) -> None:
    cm = one(build(overlay, "platform"), "ConfigMap", "dino-grafana-dashboard")
    assert cm["metadata"]["labels"].get("grafana_dashboard") == "1"
    (text,) = cm["data"].values()
    dashboard = json.loads(text)
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    assert sum(check_promql(e, "dashboard") for e in exprs) >= len(dashboard["panels"])
    queried = {m.group(1) for e in exprs for m in SELECTOR_RE.finditer(e)}
    for required in ("dino_loss", "dino_step_seconds_bucket", "dino_data_wait_seconds_bucket",
                     "dino_skipped_steps_total", "dino_eval_ap"):
        assert required in queried, f"the dashboard does not show {required}"
    assert any("dino_images" in name for name in queried), "the dashboard does not show images/s"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def selector_matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_monitors_select_the_pods(overlay: str) -> None:
    platform = build(overlay, "platform")
    trainer_monitor = one(platform, "PodMonitor", "dino-trainer")
    ray_monitor = one(platform, "PodMonitor", "dino-ray")
    (endpoint,) = trainer_monitor["spec"]["podMetricsEndpoints"]
    keep = next(r for r in endpoint["relabelings"] if r["action"] == "keep")
    for stage in ("pretrain", "finetune", "pretrain-jobset", "finetune-jobset"):
        (run,) = training_runs(build(overlay, stage))
        assert selector_matches(trainer_monitor["spec"]["selector"], run.template["metadata"]["labels"])
        ports = [p["name"] for p in run.container.get("ports", [])]
        kept = [p for p in ports if re.fullmatch(keep["regex"], p)]
        assert kept and all(p.startswith("metrics-rank") for p in kept), (stage, ports)
    for job in by_kind(build(overlay, "build-shards"), "RayJob"):
        cluster = job["spec"]["rayClusterSpec"]
        for group in [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]:
            tpl = group["template"]
            assert selector_matches(ray_monitor["spec"]["selector"], tpl["metadata"]["labels"])
            ports = {p["name"]: p["containerPort"] for c in tpl["spec"]["containers"] for p in c.get("ports", [])}
            assert ports.get("metrics") == int(group["rayStartParams"]["metrics-export-port"])


def test_jobset_and_trainer_runtime_pods_agree() -> None:
    """The JobSet variant repeats the Trainer runtime's pod spec; they must not drift."""
    for overlay in OVERLAYS:
        (runtime_run,) = training_runs(build(overlay, "pretrain"))
        (jobset_run,) = training_runs(build(overlay, "pretrain-jobset"))

        def comparable(run: TrainingRun) -> dict:
            spec = copy.deepcopy(run.template["spec"])
            container = copy.deepcopy(run.container)
            for key in ("args",):
                container.pop(key, None)
            rank_vars = {"NNODES", "GPUS_PER_NODE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"}
            container["env"] = [e for e in container.get("env", []) if e["name"] not in rank_vars]
            spec["containers"] = [container]
            return spec

        assert comparable(runtime_run) == comparable(jobset_run), overlay


def test_resize_overlay_resumes_the_same_run_on_fewer_nodes_with_the_same_global_batch(tmp_path: Path) -> None:
    """gpu-cluster/pretrain-resize (docs/cluster.md, "Changing the number of nodes"): the
    same TrainJob and output directory (so it resumes the same checkpoints) on half the
    nodes, with the global batch kept by gradient accumulation."""
    from dino_scale.config import load_config

    runs = {}
    for stage in ("pretrain", "pretrain-resize"):
        objs = build("gpu-cluster", stage)
        for job in by_kind(objs, "TrainJob"):
            assert not validate_custom(job), validate_custom(job)[:20]
        configmaps = {o["metadata"]["name"]: o for o in by_kind(objs, "ConfigMap")}
        (run,) = training_runs(objs)
        argv = [expand(a, run.node_envs[-1]) for a in run.container["args"]]
        ds = node_launcher().check_command(argv)
        args = entry_point_parser(ds.user_script).parse_args(ds.user_args)
        mounts = mounted_configs(run.template, configmaps, tmp_path / stage)
        mount = next(m for m in mounts if args.config.startswith(m + "/"))
        cfg = load_config(mounts[mount] / Path(args.config).relative_to(mount), args.overrides)
        ranks = ds.num_nodes * ds.num_gpus
        global_batch = ranks * cfg.deepspeed.micro_batch_per_gpu * cfg.deepspeed.gradient_accumulation_steps
        runs[stage] = {"where": run.where, "nodes": ds.num_nodes, "ranks": ranks, "global_batch": global_batch,
                       "output_dir": cfg.paths.output_dir, "allow_change": cfg.train.allow_global_batch_change}
    base, resized = runs["pretrain"], runs["pretrain-resize"]
    assert (base["nodes"], resized["nodes"]) == (8, 4)
    assert resized["where"] == base["where"] and resized["output_dir"] == base["output_dir"]
    assert resized["global_batch"] == base["global_batch"] and not resized["allow_change"]
