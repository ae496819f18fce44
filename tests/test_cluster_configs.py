"""cluster/: launcher YAMLs against Ray's own schema, KubeRay manifests, token auth, entrypoints (no Ray started)."""
from __future__ import annotations

import copy
import ipaddress
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER = [CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"]
KUBERAY = [CLUSTER / "kuberay" / n for n in ("raycluster.yaml", "rayjob-train.yaml", "rayjob-tune.yaml")]
RAYJOBS = [p for p in KUBERAY if p.name.startswith("rayjob-")]
SECRET = ("ray-auth-token", "token")
DASHBOARD_PORT = 8265
PUBLIC = ("0.0.0.0/0", "::/0")


def _load(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document of a file."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kind(path: Path, kind: str) -> list[dict[str, Any]]:
    return [d for d in _load(path) if d.get("kind") == kind]


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every mapping nested anywhere in a parsed YAML document."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _cluster_specs(path: Path) -> list[dict[str, Any]]:
    """RayCluster specs of a file: RayCluster.spec and RayJob.spec.rayClusterSpec."""
    specs = [d["spec"] for d in _kind(path, "RayCluster")]
    specs += [d["spec"]["rayClusterSpec"] for d in _kind(path, "RayJob")]
    return specs


def _ray_containers(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(group, container) for the head, every worker group and the autoscaler sidecar."""
    out = [("head", c) for c in spec["headGroupSpec"]["template"]["spec"]["containers"]]
    for group in spec["workerGroupSpecs"]:
        out += [(group["groupName"], c) for c in group["template"]["spec"]["containers"]]
    if spec.get("enableInTreeAutoscaling"):
        out.append(("autoscaler", spec.get("autoscalerOptions") or {}))
    return out


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env") or []}


def _entrypoint(path: Path) -> tuple[str, list[str]]:
    """(module, args) of `python -m hnm_ray.X args...` in a RayJob's entrypoint."""
    (job,) = _kind(path, "RayJob")
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:2] == ["python", "-m"] and words[2].startswith("hnm_ray."), \
        f"{path.name}: entrypoint must be `python -m hnm_ray.<module> ...`, got {words[:3]}"
    return words[2], words[3:]


def _module_file(module: str) -> Path | None:
    rel = Path(*module.split("."))
    for candidate in (REPO / rel.with_suffix(".py"), REPO / rel / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _flags(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


# --------------------------------------------------------------------------- every file


def test_every_cluster_file_is_present_and_every_yaml_parses():
    for path in [*LAUNCHER, *KUBERAY, CLUSTER / "Dockerfile", CLUSTER / "README.md"]:
        assert path.is_file(), f"missing {path.relative_to(REPO)}"
    yamls = sorted(CLUSTER.rglob("*.yaml")) + sorted(CLUSTER.rglob("*.yml"))
    assert set(LAUNCHER + KUBERAY) <= set(yamls)
    for path in yamls:
        docs = _load(path)
        assert docs and all(isinstance(d, dict) for d in docs), f"{path.name}: expected YAML mappings"


# --------------------------------------------------------------------------- cluster launcher


@pytest.fixture(scope="module")
def ray_schema() -> dict[str, Any]:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_config_matches_rays_schema(path, ray_schema):
    import jsonschema

    config = _load(path)[0]
    errors = sorted(jsonschema.Draft7Validator(ray_schema).iter_errors(config), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{path.name}: {'/'.join(map(str, e.path))}: {e.message}" for e in errors)


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_config_passes_ray_up_validation(path):
    """The same default-filling and checks `ray up` runs before it touches the cloud."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(_load(path)[0])))


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_cpu_head_gpu_workers_and_bounds(path):
    config = _load(path)[0]
    assert config["cluster_name"] and config["provider"]["type"] == path.stem
    types = config["available_node_types"]
    head = config["head_node_type"]
    assert head in types
    assert types[head]["resources"].get("GPU", 0) == 0, "the head must be CPU-only"
    workers = {name: t for name, t in types.items() if name != head}
    gpu_workers = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_workers, "no worker type advertises a GPU"
    for name, t in workers.items():
        assert 0 <= t.get("min_workers", 0) <= t["max_workers"], f"{name}: need 0 <= min_workers <= max_workers"
        assert t["resources"].get("CPU", 0) >= 1, f"{name}: workers need CPUs for decoding"
    assert config["max_workers"] >= sum(t.get("min_workers", 0) for t in workers.values())
    assert config["max_workers"] >= 1
    if path.stem == "aws":
        for t in gpu_workers.values():
            assert re.match(r"(g4dn|g5|g6|g6e|p3|p4d|p4de|p5)\.", t["node_config"]["InstanceType"])
    else:
        for t in gpu_workers.values():
            (accel,) = t["node_config"]["guestAccelerators"]
            assert accel["acceleratorType"].startswith("nvidia-") and accel["acceleratorCount"] >= 1
            assert accel["acceleratorCount"] == t["resources"]["GPU"]
            assert t["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE"


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_installs_the_repo_and_mounts_shared_storage(path):
    config = _load(path)[0]
    setup = "\n".join(config["setup_commands"])
    assert "." in config["file_mounts"].values(), "the repo checkout must be synced to the nodes"
    repo_remote = next(r for r, local in config["file_mounts"].items() if local == ".")
    assert re.search(r"pip install .*-e \S*" + re.escape(repo_remote.replace("~", "$HOME")), setup)
    assert "ray[default]==2.60" in setup
    assert "constraints/cpu.txt" not in setup, "GPU nodes need the CUDA torch build"
    assert "--python 3.11" in setup
    assert "mount" in setup and " /data" in setup, "shared storage must be mounted at /data"


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_turns_token_auth_on_every_node(path):
    config = _load(path)[0]
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token", \
        "every node needs the same token file (ray start never creates one)"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), f"{key}: ray start without token auth"
    assert "export RAY_AUTH_MODE=token" in "\n".join(config["setup_commands"]), \
        "shells on the nodes (ray exec/attach, job drivers) need RAY_AUTH_MODE=token"


def _rule_opens_port(rule: dict[str, Any], port: int) -> bool:
    if str(rule.get("IpProtocol", "tcp")) == "-1":
        return True
    low, high = rule.get("FromPort", -1), rule.get("ToPort", -1)
    return low == -1 or low <= port <= high


def _public(cidr: str) -> bool:
    return cidr in PUBLIC or ipaddress.ip_network(cidr, strict=False).prefixlen == 0


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_keeps_the_dashboard_off_the_internet(path):
    config = _load(path)[0]
    for node in _walk(config):
        for rule in node.get("IpPermissions") or []:  # AWS security group rules
            ranges = [r["CidrIp"] for r in rule.get("IpRanges", [])]
            ranges += [r["CidrIpv6"] for r in rule.get("Ipv6Ranges", [])]
            assert not (_rule_opens_port(rule, DASHBOARD_PORT) and any(map(_public, ranges))), \
                f"{path.name}: security group opens {DASHBOARD_PORT} to the internet: {rule}"
        if "sourceRanges" in node:  # GCP firewall rules
            ports = [p for a in node.get("allowed", []) for p in a.get("ports", ["0-65535"])]
            opens = any(str(DASHBOARD_PORT) == p or ("-" in p and int(p.split("-")[0]) <= DASHBOARD_PORT
                                                   <= int(p.split("-")[1])) for p in ports)
            assert not (opens and any(map(_public, node["sourceRanges"]))), \
                f"{path.name}: firewall opens {DASHBOARD_PORT} to the internet"


# --------------------------------------------------------------------------- KubeRay


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_head_and_gpu_worker_groups(path):
    docs = _load(path)
    assert all(d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name") for d in docs)
    ray_docs = [d for d in docs if d["kind"] in ("RayCluster", "RayJob")]
    assert len(ray_docs) == 1 and ray_docs[0]["apiVersion"] == "ray.io/v1"
    expected = "RayJob" if path in RAYJOBS else "RayCluster"
    assert ray_docs[0]["kind"] == expected
    (spec,) = _cluster_specs(path)
    assert spec["rayVersion"] == "2.60.0"
    head = spec["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), "rayStartParams values must be strings"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    (head_container,) = head["template"]["spec"]["containers"]
    head_limits = head_container["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_limits and head_limits["cpu"] and head_limits["memory"]
    assert {p["containerPort"] for p in head_container["ports"]} >= {6379, DASHBOARD_PORT}
    assert spec["workerGroupSpecs"], "no worker group"
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        for container in group["template"]["spec"]["containers"]:
            limits = container["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) >= 1, f"{group['groupName']}: no nvidia.com/gpu limit"
            assert limits["cpu"] and limits["memory"]
            assert container["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_token_auth_from_secret_in_every_container(path):
    (spec,) = _cluster_specs(path)
    containers = _ray_containers(spec)
    for job in _kind(path, "RayJob"):
        template = job["spec"].get("submitterPodTemplate")
        assert template, f"{path.name}: the submitter (`ray job submit`) needs the token: set submitterPodTemplate"
        assert not template["spec"]["containers"][0].get("command"), "leave the command to KubeRay"
        containers += [("submitter", c) for c in template["spec"]["containers"]]
    for where, container in containers:
        env = _env(container)
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{path.name} {where}: RAY_AUTH_MODE != token"
        ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
        assert (ref.get("name"), ref.get("key")) == SECRET, f"{path.name} {where}: RAY_AUTH_TOKEN not from {SECRET}"
        assert "value" not in env["RAY_AUTH_TOKEN"], "never put the token itself in a manifest"


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_pods_mount_the_shared_volume(path):
    (spec,) = _cluster_specs(path)
    claims = set()
    pod_specs = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pod_specs:
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert "/data" in mounts, "every Ray pod mounts the shared volume at /data"
            claims.add(volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"])
    assert len(claims) == 1
    pvcs = {d["metadata"]["name"]: d for d in _kind(CLUSTER / "kuberay" / "raycluster.yaml", "PersistentVolumeClaim")}
    (claim,) = claims
    assert claim in pvcs, f"PVC {claim} is not defined in raycluster.yaml"
    assert "ReadWriteMany" in pvcs[claim]["spec"]["accessModes"], "the volume is shared by pods on many nodes"


def test_kuberay_nothing_is_exposed_outside_the_cluster():
    for path in KUBERAY:
        for doc in _load(path):
            assert doc["kind"] not in ("Ingress", "Gateway", "HTTPRoute"), f"{path.name}: {doc['kind']} exposes Ray"
            if doc["kind"] == "Service":
                assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", f"{path.name}: Service must be ClusterIP"
        for spec in _cluster_specs(path):
            assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    services = _kind(CLUSTER / "kuberay" / "raycluster.yaml", "Service")
    assert any(p["port"] == DASHBOARD_PORT for s in services for p in s["spec"]["ports"]), "no dashboard Service"
    (cluster,) = _kind(CLUSTER / "kuberay" / "raycluster.yaml", "RayCluster")
    for service in services:
        head = {"ray.io/cluster": cluster["metadata"]["name"], "ray.io/node-type": "head"}
        assert service["spec"]["selector"] == head, f"{service['metadata']['name']} must select the head pod"


def test_every_container_runs_the_same_image():
    images = {c["image"] for path in KUBERAY for spec in _cluster_specs(path) for _, c in _ray_containers(spec)
              if "image" in c}
    images |= {c["image"] for path in RAYJOBS for job in _kind(path, "RayJob")
               for c in job["spec"]["submitterPodTemplate"]["spec"]["containers"]}
    assert len(images) == 1, f"one image built from cluster/Dockerfile, got {images}"


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_lifecycle(path):
    (job,) = _kind(path, "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"
    assert spec["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_entrypoint_module_exists(path):
    module, args = _entrypoint(path)
    assert _module_file(module) is not None, \
        f"{path.name}: `python -m {module}` but neither {module.replace('.', '/')}.py nor its package exists"
    for flag, value in zip(args, args[1:]):
        if flag in ("--manifest", "--runs-dir", "--storage-path", "--store"):
            assert value.startswith("/data/"), f"{flag} {value}: inputs/outputs belong on the shared volume /data"


def test_train_entrypoint_flags_parse():
    """Every flag of the train RayJob (and of the README's examples) is accepted by hnm_ray.train's parser."""
    from hnm_ray.train import parse_args

    module, args = _entrypoint(CLUSTER / "kuberay" / "rayjob-train.yaml")
    assert module == "hnm_ray.train"
    wanted = {"--manifest", "--runs-dir", "--encoder.name", "--extract.num_encoders", "--finetune.workers",
              "--finetune.use_gpu", "--mil.workers"}
    assert wanted <= set(_flags(args))
    config, run_dir = _parse_train(parse_args, args)
    assert config.run.manifest == "/data/slides.csv" and config.finetune.use_gpu is True
    assert config.encoder.name == "resnet18_in"
    assert config.extract.num_encoders >= 1 and config.finetune.workers >= 1 and config.mil.workers >= 1
    assert str(run_dir).startswith("/data/runs/")
    readme = _readme_commands("hnm_ray.train")
    assert readme, "cluster/README.md shows no `python -m hnm_ray.train` command"
    for command in readme:
        _parse_train(parse_args, command)


def test_readme_section_flags_are_knobs():
    """Every `--section.knob` the README names (sizing table, prose) is a flag of hnm_ray.train or hnm_ray.tune."""
    import argparse

    from hnm_ray import config as cfg
    from hnm_ray.tune import TuneConfig

    parser = argparse.ArgumentParser()
    cfg.add_arguments(parser, TuneConfig)  # TrainConfig's knobs and the sweep section
    named = set(re.findall(r"--[a-z]+\.[\w.-]*\w", (CLUSTER / "README.md").read_text()))
    assert named, "cluster/README.md names no --section.knob flag"
    unknown = sorted(named - set(parser._option_string_actions))
    assert not unknown, f"cluster/README.md names flags hnm_ray does not take: {unknown}"


def _parse_train(parse_args, args: list[str]):
    try:
        return parse_args(args)
    except SystemExit as exc:  # argparse: unknown flag or bad value (its message is in the captured stderr)
        pytest.fail(f"`python -m hnm_ray.train {shlex.join(args)}` is rejected by its parser (exit {exc.code})")


def test_tune_entrypoint_flags_exist():
    """Every flag of the tune RayJob appears in `python -m hnm_ray.tune --help` (checked once tune.py exists)."""
    module, args = _entrypoint(CLUSTER / "kuberay" / "rayjob-tune.yaml")
    assert module == "hnm_ray.tune"
    assert {"--manifest", "--num-samples", "--storage-path", "--finetune.workers"} <= set(_flags(args))
    if _module_file(module) is None:
        pytest.skip("hnm_ray/tune.py does not exist yet (test_rayjob_entrypoint_module_exists fails for it)")
    helptext = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                              timeout=120)
    assert helptext.returncode == 0, helptext.stderr[-2000:]
    wanted = set(_flags(args)) | {f for c in _readme_commands(module) for f in _flags(c)}
    missing = [f for f in sorted(wanted) if not re.search(re.escape(f) + r"(?![\w.-])", helptext.stdout)]
    assert not missing, f"flags not in `python -m {module} --help`: {missing}"
    import argparse

    from hnm_ray import config as cfg
    from hnm_ray.tune import TuneConfig

    parser = argparse.ArgumentParser(prog=module)  # the knobs of `main`'s parser: flags -> one validated tree
    cfg.add_source_arguments(parser)
    cfg.add_arguments(parser, TuneConfig)
    for command in [args, *_readme_commands(module)]:
        config = cfg.load_config(TuneConfig, parser.parse_args(command))
        assert config.run.manifest.startswith("/data/") and config.sweep.storage_path.startswith("/data/")
        assert config.finetune.use_gpu is True and config.finetune.workers >= 1
    # Its GPU group starts at 0 pods: GPUs are not there at the job's start to be detected, so it asks for them.
    assert cfg.load_config(TuneConfig, parser.parse_args(args)).extract.gpus_per_encoder == 1


# --------------------------------------------------------------------------- Dockerfile and README


def _readme_commands(module: str) -> list[list[str]]:
    """Arguments after `python -m <module>` in the shell blocks of cluster/README.md."""
    blocks = re.findall(r"```bash\n(.*?)```", (CLUSTER / "README.md").read_text(), re.S)
    out = []
    for line in "\n".join(blocks).replace("\\\n", " ").splitlines():
        if f"python -m {module} " in line:
            out.append(shlex.split(line.split(f"python -m {module} ", 1)[1], comments=True))
    return out


def test_dockerfile_cuda13_python311_editable_gpu_install():
    text = (CLUSTER / "Dockerfile").read_text()
    instructions = [l for l in text.splitlines() if l.strip() and not l.lstrip().startswith("#")]
    body = "\n".join(instructions)
    # CUDA 13: the major of the tested torch's PyPI build (constraints/gpu.txt, tests/test_gpu_install.py)
    assert re.search(r"CUDA_IMAGE=nvidia/cuda:13\.\d+(\.\d+)?-\w*runtime-ubuntu", body), "CUDA 13 runtime base"
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}", body, re.M)
    assert "PYTHON_VERSION=3.11" in body
    assert re.search(r"pip install .*-e \"?\.(\[[\w,]+\])?\"?", body), "editable install of the repo"
    assert "ray[default]==${RAY_VERSION}" in body and "RAY_VERSION=2.60.0" in body
    assert "constraints/cpu.txt" not in body, "the CPU constraints would pin the CPU torch wheel"
    assert "COPY hnm_ray" in body and "COPY pyproject.toml" in body
    assert re.search(r"^USER ", body, re.M), "run as a non-root user"


def test_readme_documents_the_commands_and_names_real_files():
    text = (CLUSTER / "README.md").read_text()
    for command in ("ray get-auth-token --generate", "ray up cluster/aws.yaml", "ray dashboard cluster/aws.yaml",
                    "ray job submit --address http://127.0.0.1:8265 --working-dir . --", "export RAY_AUTH_MODE=token",
                    "RAY_AUTH_TOKEN", "kubectl create secret generic ray-auth-token --from-literal=token=",
                    "kubectl apply -f cluster/kuberay/", "ray down cluster/aws.yaml", "--extract.num_encoders",
                    "--finetune.workers", "python -m hnm_ray.tune"):
        assert command in text, f"cluster/README.md does not show `{command}`"
    for name in set(re.findall(r"cluster/[\w./-]+\.(?:yaml|md)|cluster/Dockerfile", text)):
        assert (REPO / name).is_file(), f"README names {name}, which does not exist"
    secret_name, secret_key = SECRET
    assert f"--from-literal={secret_key}=" in text and secret_name in text
