"""The deployment files agree with the code and with each other.

Nothing here builds an image or talks to Docker or Kubernetes: every YAML file parses, every
``mistnet`` command line in the Dockerfiles, compose files, manifests and deployment docs is accepted
by the real argument parser, names, ports, paths and secret keys match across files, the broker
configuration the containers use runs in a real mosquitto with init-auth accounts, and the job the
manifests carry is a valid job. ``kubectl kustomize`` renders the manifests where kubectl exists.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from broker.auth import init_auth
from broker.launcher import find_mosquitto, free_port, parse_listeners, rewrite_config, wait_for_port
from common.jobspec import JobSpec, load_job, parse_job_text
from common.metrics import main as metrics_main
from mistnet.cli import build_parser
from tests.agents import without

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_GPU = DEPLOY / "compose.gpu.yaml"
DOCKERFILES = {"edge": DEPLOY / "docker" / "Dockerfile.edge", "cloud": DEPLOY / "docker" / "Dockerfile.cloud"}
BROKER_CONF = REPO / "broker" / "conf" / "mosquitto.conf"
START_SCRIPT = DEPLOY / "mosquitto" / "start-mosquitto.sh"
SEDNA_JOB = REPO / "examples" / "sedna" / "yolov5_coco128_mistnet.yaml"
DOCS = [REPO / "docs" / "deploy.md", REPO / "docs" / "monitoring.md", REPO / "README.md"]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
EDGE_IMAGE, CLOUD_IMAGE = "mistnet-edge", "mistnet-cloud"
MISTNET_IMAGES = {EDGE_IMAGE, CLOUD_IMAGE}
MQTT_PORT = 1883

# Import names of what the edge image leaves out: pyproject dependencies it does not install, their
# heavy dependencies, and the cloud's own code. An edge run with these blocked proves it needs none.
EDGE_BLOCKED = {
    "torchvision", "matplotlib", "pycocotools", "mlxtend", "scipy", "sklearn", "pandas", "amqtt", "moto",
    "psutil", "skimage", "cloud_agent", "torch", "safetensors", "onnx", "imagecorruptions",
}  # fmt: skip
IMPORT_NAMES = {"paho-mqtt": "paho", "pyyaml": "yaml", "pillow": "PIL", "prometheus-client": "prometheus_client",
                "scikit-image": "skimage", "imagecorruptions-imaug": "imagecorruptions"}


# Reading the files ------------------------------------------------------------------------------------


def yaml_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def deploy_yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*.y*ml") if "broker-auth" not in p.parts)


def k8s_objects() -> list[dict[str, Any]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            out.extend(yaml_docs(path))
    return out


def k8s_find(kind: str, name: str) -> dict[str, Any]:
    found = [o for o in k8s_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} objects"
    return found[0]


def pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    for obj in k8s_objects():
        if obj["kind"] in ("Deployment", "Job"):
            yield f"{obj['kind']}/{obj['metadata']['name']}", obj["spec"]["template"]["spec"]


def image_name(image: str) -> tuple[str, str]:
    name, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "latest")
    return name.split("/")[-1], tag


def dockerfile(path: Path) -> list[str]:
    """Instructions, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        if raw.lstrip().startswith("#") and not current:
            continue
        if raw.endswith("\\"):
            current += raw[:-1] + " "
            continue
        current += raw
        if current.strip():
            lines.append(current.strip())
        current = ""
    return lines


def dockerfile_json(path: Path, instruction: str) -> list[str]:
    found = [line for line in dockerfile(path) if line.split()[0] == instruction]
    assert len(found) == 1, f"{path.name}: {len(found)} {instruction}"
    return list(json.loads(found[0][len(instruction) :].strip()))


def dockerfile_env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in dockerfile(path):
        if line.startswith("ENV "):
            for item in shlex.split(line[4:]):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def dockerfile_args(path: Path) -> dict[str, str]:
    return dict(line[4:].split("=", 1) for line in dockerfile(path) if line.startswith("ARG ") and "=" in line)


def conf_value(text: str, key: str) -> str:
    values = [line.split(None, 1)[1] for line in text.splitlines() if line.split()[:1] == [key]]
    assert len(values) == 1, f"{key}: {values}"
    return values[0].strip()


def job_spec() -> JobSpec:
    return load_job(SEDNA_JOB)


# Command lines ------------------------------------------------------------------------------------------

_STOP = {"|", "||", "&&", ";", "&", ">", ">>", "2>", "2>&1"}


def command_after(line: str) -> list[str] | None:
    """The mistnet arguments of a shell line (``mistnet ...``, ``docker run ... mistnet-edge:T ...``)."""
    line = line.strip().lstrip("#").strip()
    line = re.sub(r"^\$\s+", "", line)
    line = re.split(r"\s#\s", line, maxsplit=1)[0]
    try:
        tokens = shlex.split(line)
    except ValueError:
        return None
    for i, token in enumerate(tokens):
        if token in _STOP or token.startswith((">", "2>")):
            tokens = tokens[:i]
            break
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", tokens[0]):
        tokens = tokens[1:]
    if tokens[:1] == ["mistnet"]:
        return tokens[1:]
    if "--" in tokens and tokens[tokens.index("--") + 1 : tokens.index("--") + 2] == ["mistnet"]:
        return tokens[tokens.index("--") + 2 :]
    if tokens[:2] == ["docker", "run"]:
        for i, token in enumerate(tokens):
            if image_name(token)[0] in MISTNET_IMAGES and ":" in token:
                return tokens[i + 1 :]
    if tokens[:2] == ["docker", "compose"] and "run" in tokens:
        services = yaml_docs(COMPOSE)[0]["services"]
        ours = {n for n, s in services.items() if image_name(s.get("image", ""))[0] in MISTNET_IMAGES}
        for i in range(tokens.index("run") + 1, len(tokens)):
            if tokens[i] in ours and not tokens[i - 1].startswith("-"):
                return tokens[i + 1 :]
    return None


def text_commands(path: Path) -> Iterator[tuple[str, list[str]]]:
    """Command lines in comments (YAML, Dockerfile, shell) or in a Markdown file's code blocks."""
    text = re.sub(r"\\\n\s*#?", " ", path.read_text())  # continuation lines, in comments too
    in_code = path.suffix != ".md"
    for number, line in enumerate(text.splitlines(), 1):
        if path.suffix == ".md" and line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        if not in_code or (path.suffix != ".md" and not line.lstrip().startswith("#")):
            continue
        argv = command_after(line)
        if argv:
            yield f"{path.relative_to(REPO)}:{number}", argv


def manifest_commands() -> Iterator[tuple[str, str, list[str]]]:
    """(where, image, mistnet argv) of every container that runs the image's mistnet entry point."""
    for path in (COMPOSE, COMPOSE_GPU):
        for name, service in yaml_docs(path)[0]["services"].items():
            image = service.get("image") or yaml_docs(COMPOSE)[0]["services"][name]["image"]
            if image_name(image)[0] in MISTNET_IMAGES and "command" in service:
                assert "entrypoint" not in service
                yield f"{path.name}:{name}", image, [str(a) for a in service["command"]]
    for where, spec in pod_specs():
        for container in spec.get("containers", []) + spec.get("initContainers", []):
            if image_name(container["image"])[0] in MISTNET_IMAGES and "command" not in container:
                yield f"{where}/{container['name']}", container["image"], [str(a) for a in container["args"]]
    for path in K8S.rglob("*.yaml"):
        for doc in yaml_docs(path):
            if doc.get("kind") == "Job" and path.parent.name == "gpu":
                for c in doc["spec"]["template"]["spec"]["containers"]:
                    yield f"{path.relative_to(REPO)}:{c['name']}", f"{CLOUD_IMAGE}:{VERSION}", list(c["args"])
    for role, path in DOCKERFILES.items():
        entry = dockerfile_json(path, "ENTRYPOINT")
        assert entry[-1] == "mistnet", entry
        yield f"{path.name} CMD", f"mistnet-{role}:{VERSION}", dockerfile_json(path, "CMD")


def parse(argv: list[str]) -> tuple[int, str]:
    """(exit status, messages) of the real parser; 0 also for --help."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            build_parser().parse_args(argv)
        except SystemExit as exc:
            return int(exc.code or 0), err.getvalue()
    return 0, ""


def option(argv: list[str], flag: str) -> str:
    assert flag in argv, f"{flag} missing from {argv}"
    return argv[argv.index(flag) + 1]


# Tests --------------------------------------------------------------------------------------------------


def test_every_yaml_under_deploy_parses():
    files = deploy_yaml_files()
    assert {p.name for p in files} >= {"compose.yaml", "compose.gpu.yaml", "kustomization.yaml", "cloud.yaml"}
    for path in files:
        docs = yaml_docs(path)
        assert docs, f"{path} is empty"
        for doc in docs:
            assert isinstance(doc, dict), f"{path}: a document is a {type(doc).__name__}"
    for obj in k8s_objects():
        assert {"apiVersion", "kind", "metadata"} <= set(obj), obj


def test_every_mistnet_command_in_images_compose_manifests_and_docs_exists():
    seen = list(manifest_commands())
    for path in [*DOCKERFILES.values(), COMPOSE, COMPOSE_GPU, *K8S.rglob("*.yaml"), START_SCRIPT, *DOCS]:
        seen.extend((where, "", argv) for where, argv in text_commands(path))
    assert len(seen) >= 15, seen
    subcommands = set()
    for where, image, argv in seen:
        status, messages = parse(argv)
        assert status == 0, f"{where}: mistnet {shlex.join(argv)}: {messages.strip()}"
        subcommands.add(argv[0])
        role = image_name(image)[0] if image else ""
        if role == EDGE_IMAGE and image:
            assert argv[0] == "edge", f"{where}: the edge image runs {argv[0]}"
        if role == CLOUD_IMAGE and image:
            assert argv[0] == "cloud", f"{where}: the cloud image runs {argv[0]}"
    assert {"edge", "cloud", "broker", "report", "monitor", "job"} <= subcommands


def test_yaml_and_json_examples_in_the_docs_parse():
    blocks = []
    for path in DOCS:
        blocks += re.findall(r"```(yaml|json)\n(.*?)```", path.read_text(), flags=re.S)
    assert sum(kind == "json" for kind, _ in blocks) >= 1 and sum(kind == "yaml" for kind, _ in blocks) >= 2
    for kind, text in blocks:
        json.loads(text) if kind == "json" else yaml.safe_load(text)


def test_health_checks_run_real_commands(monkeypatch):
    monkeypatch.delenv("MISTNET_METRICS_PORT", raising=False)
    for path in DOCKERFILES.values():
        line = next(x for x in dockerfile(path) if x.startswith("HEALTHCHECK"))
        argv = json.loads(line[line.index("CMD") + 3 :])
        assert argv[:4] == ["python", "-m", "common.metrics", "check"], argv
        assert metrics_main(argv[3:]) == 0  # metrics off: nothing to check
    assert metrics_main(["check", "--port", str(free_port())]) == 1  # nothing listens


def test_images_tags_and_ports_agree_everywhere():
    edge, cloud = f"{EDGE_IMAGE}:{VERSION}", f"{CLOUD_IMAGE}:{VERSION}"
    compose = yaml_docs(COMPOSE)[0]["services"]
    assert compose["edge1"]["image"] == compose["edge2"]["image"] == edge
    assert compose["cloud"]["image"] == f"{cloud}-cpu"
    assert yaml_docs(COMPOSE_GPU)[0]["services"]["cloud"]["image"] == cloud
    containers = [c for _, spec in pod_specs() for c in spec.get("containers", []) + spec.get("initContainers", [])]
    images = {c["image"] for c in containers}
    assert {i for i in images if image_name(i)[0] in MISTNET_IMAGES} == {edge, f"{cloud}-cpu"}
    gpu = yaml_docs(K8S / "components" / "gpu" / "kustomization.yaml")[0]
    assert gpu["images"] == [{"name": CLOUD_IMAGE, "newTag": VERSION}]
    kustomization = yaml_docs(K8S / "kustomization.yaml")[0]
    assert {i["name"] for i in kustomization["images"]} == MISTNET_IMAGES
    for path in DOCKERFILES.values():
        assert f"mistnet-{path.name.split('.')[-1]}:{VERSION}" in path.read_text()

    # MQTT: the broker config's listener, the containers, the Service, the health checks.
    assert [lst.port for lst in parse_listeners(BROKER_CONF.read_text())] == [MQTT_PORT]
    assert compose["mosquitto"]["ports"] == [f"{MQTT_PORT}:{MQTT_PORT}"]
    assert f"-p {MQTT_PORT} " in compose["mosquitto"]["healthcheck"]["test"][1]
    broker = k8s_find("Deployment", "mosquitto")["spec"]["template"]["spec"]["containers"][0]
    assert broker["ports"] == [{"name": "mqtt", "containerPort": MQTT_PORT, "hostPort": MQTT_PORT}]
    assert f"-p {MQTT_PORT} " in broker["readinessProbe"]["exec"]["command"][2]
    assert k8s_find("Service", "mosquitto")["spec"]["ports"][0]["port"] == MQTT_PORT

    # Metrics: the images' MISTNET_METRICS_PORT, what compose publishes, what the pods declare.
    port = {dockerfile_env(p)["MISTNET_METRICS_PORT"] for p in DOCKERFILES.values()}
    assert len(port) == 1
    metrics = int(port.pop())
    for path in DOCKERFILES.values():
        assert f"EXPOSE {metrics}" in dockerfile(path)
    published = [compose[s]["ports"][0] for s in ("cloud", "edge1", "edge2")]
    assert all(p.endswith(f":{metrics}") and p.startswith("127.0.0.1:") for p in published)
    assert len({p.split(":")[1] for p in published}) == 3
    for where, spec in pod_specs():
        for c in spec["containers"]:
            if image_name(c["image"])[0] in MISTNET_IMAGES:
                assert c["ports"] == [{"name": "metrics", "containerPort": metrics}], where
                assert {"name": "MISTNET_METRICS_PORT", "value": str(metrics)} in c["env"], where
    for obj in k8s_objects():
        annotations = obj.get("spec", {}).get("template", {}).get("metadata", {}).get("annotations", {})
        if "prometheus.io/port" in annotations:
            assert annotations["prometheus.io/port"] == str(metrics)


def test_dockerfiles_install_the_declared_dependencies_and_all_code():
    torch_pin = re.search(r"TORCH\s*\?=\s*torch==(\S+) torchvision==(\S+)", (REPO / "Makefile").read_text())
    assert torch_pin
    edge, cloud = (dockerfile(p) for p in DOCKERFILES.values())
    edge_args, cloud_args = (dockerfile_args(p) for p in DOCKERFILES.values())
    assert cloud_args["TORCH_VERSION"] == torch_pin.group(1)
    assert cloud_args["TORCHVISION_VERSION"] == torch_pin.group(2)
    assert not [k for k in edge_args if k.startswith("TORCH")]  # the edge image has no torch to pick
    compose = yaml_docs(COMPOSE)[0]["services"]
    assert compose["cloud"]["build"]["args"]["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    gpu = yaml_docs(COMPOSE_GPU)[0]["services"]["cloud"]["build"]["args"]["TORCH_INDEX"]
    assert gpu == cloud_args["TORCH_INDEX"]

    # Each image installs its extra of pyproject.toml and nothing else.
    for lines, extra in ((edge, "edge"), (cloud, "cloud")):
        installs = [line for line in lines if "pip install" in line and "TORCH" not in line]
        assert installs == [f'RUN pip install ".[{extra}]" && rm -rf /src'], installs
    extras = PYPROJECT["project"]["optional-dependencies"]
    leaves_out = {re.split(r"[<>=!~ ]", d)[0].lower() for d in extras["cloud"]} - {
        re.split(r"[<>=!~ ]", d)[0].lower() for d in extras["edge"]
    }
    # the edge needs neither torch nor the cloud's training/eval stack, the fallback broker or benchmark tools
    assert leaves_out == {
        "torch", "onnx", "safetensors", "torchvision", "pycocotools", "matplotlib", "mlxtend", "amqtt", "psutil",
        "scikit-image", "imagecorruptions-imaug",
    }  # fmt: skip
    assert {IMPORT_NAMES.get(d, d) for d in leaves_out} <= EDGE_BLOCKED

    patterns = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {
        p.name for p in REPO.iterdir() if (p / "__init__.py").is_file() and any(p.match(x) for x in patterns)
    }
    assert {"common", "edge_agent", "cloud_agent", "broker", "mistnet", "bench"} <= packages
    for lines, wanted in ((cloud, packages), (edge, packages - {"cloud_agent"})):
        copied = {line.split()[1] for line in lines if line.startswith("COPY ") and "--from" not in line}
        assert copied == wanted | {"pyproject.toml"}, copied
    for lines in (edge, cloud):
        assert "USER 10001:10001" in lines and "STOPSIGNAL SIGINT" in lines


def test_edge_image_dependencies_suffice_for_an_edge(tmp_path):
    """With everything the edge image leaves out blocked, the CLI and the edge's code paths load."""
    code = (
        "import runpy, sys\n"
        "import edge_agent.agent, edge_agent.onnx_head, common.datasets.yolo, common.datasets.by_arch, common.metrics\n"
        "sys.argv = ['mistnet', 'edge', '--help']\n"
        "runpy.run_module('mistnet.cli', run_name='__main__')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=edge_image_env(tmp_path), capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--metrics-port" in done.stdout
    blocked = subprocess.run([sys.executable, "-c", "import matplotlib"], env=edge_image_env(tmp_path),
                             capture_output=True, text=True, timeout=60, cwd=REPO)
    assert blocked.returncode == 1 and "not in the edge image" in blocked.stderr


def edge_image_env(tmp: Path) -> dict[str, str]:
    """Environment for a Python process that cannot import what the edge image does not have."""
    return without(tmp, EDGE_BLOCKED, "is not in the edge image")


def test_paths_and_secrets_line_up_between_job_compose_and_manifests():
    spec = job_spec()
    conf = BROKER_CONF.read_text()
    passwd, acl = PurePosixPath(conf_value(conf, "password_file")), PurePosixPath(conf_value(conf, "acl_file"))
    data = conf_value(conf, "persistence_location").rstrip("/")
    assert passwd.parent == acl.parent

    # compose: the broker gets init-auth's passwd and acl as secrets, which the script puts where
    # the config reads them; each agent reads its own credentials file.
    doc = yaml_docs(COMPOSE)[0]
    services = doc["services"]
    assert doc["secrets"] == {"mosquitto_passwd": {"file": "broker-auth/passwd"},
                              "mosquitto_acl": {"file": "broker-auth/acl"}}
    assert services["mosquitto"]["secrets"] == ["mosquitto_passwd", "mosquitto_acl"]
    script = START_SCRIPT.read_text()
    assert f"conf_dir=${{MISTNET_BROKER_CONF_DIR:-{passwd.parent}}}" in script
    assert f"data_dir=${{MISTNET_BROKER_DATA_DIR:-{data}}}" in script
    assert f'"$conf_dir/{passwd.name}"' in script and f'"$conf_dir/{acl.name}"' in script
    mounts = services["mosquitto"]["volumes"]
    assert f"../broker/conf/mosquitto.conf:{services['mosquitto']['command'][-1]}:ro" in mounts
    assert f"./mosquitto/start-mosquitto.sh:{services['mosquitto']['entrypoint'][-1]}:ro" in mounts
    assert f"mosquitto-data:{data}" in mounts

    cloud = services["cloud"]
    job_path = option(cloud["command"], "--job")
    assert f"../examples/sedna/{SEDNA_JOB.name}:{job_path}:ro" in cloud["volumes"]
    cloud_user = init_auth.__kwdefaults__["cloud"]  # init-auth's account of the cloud agent
    for name in ("cloud", "edge1", "edge2"):  # MISTNET_S3_*, when deploy/s3.env exists
        assert services[name]["env_file"][1:] == [{"path": "s3.env", "required": False}]
    assert cloud["env_file"][0] == {"path": f"broker-auth/credentials/{cloud_user}.env"}
    assert f"/model:{PurePosixPath(spec.cloud.output).parent}" in cloud["volumes"]
    assert spec.model.pretrained and f"/pretrained:{PurePosixPath(spec.model.pretrained).parent}:ro" in cloud["volumes"]
    edges = {option(s["command"], "--node"): s for s in services.values() if s.get("image", "").startswith(EDGE_IMAGE)}
    assert set(edges) == {e.node for e in spec.edges}
    for edge in spec.edges:
        service = edges[edge.node]
        assert service["env_file"][0] == {"path": f"broker-auth/credentials/{edge.node}.env"}
        assert f"{edge.dataset}:{edge.dataset}:ro" in service["volumes"]

    # Kubernetes: the same job, the same accounts, the same mount points.
    cm = k8s_find("ConfigMap", "mistnet-job")
    broker_pod = k8s_find("Deployment", "mosquitto")["spec"]["template"]["spec"]
    mounts = {m["name"]: m for m in broker_pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in broker_pod["volumes"]}
    assert mounts["accounts"]["mountPath"] == str(passwd.parent)
    assert volumes["accounts"]["secret"]["secretName"] == "mistnet-broker-auth"
    assert [i["path"] for i in volumes["accounts"]["secret"]["items"]] == [passwd.name, acl.name]
    assert mounts["data"]["mountPath"] == data
    assert mounts["config"]["mountPath"] == broker_pod["containers"][0]["command"][-1]
    assert broker_pod["nodeName"] == spec.cloud.node

    generated = {g["name"]: g for g in yaml_docs(K8S / "kustomization.yaml")[0]["secretGenerator"]}
    assert generated["mistnet-broker-auth"]["files"] == ["passwd=broker-auth/passwd", "acl=broker-auth/acl"]
    secret_names = set(generated) | {o["metadata"]["name"] for o in k8s_objects() if o["kind"] == "Secret"}
    for where, pod in pod_specs():
        for volume in pod["volumes"]:
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secret_names, where
            if "configMap" in volume:
                k8s_find("ConfigMap", volume["configMap"]["name"])
        for c in pod["containers"]:
            for ref in c.get("envFrom", []):
                assert ref["secretRef"]["name"] in secret_names
    pods = {
        cloud_user: k8s_find("Job", "mistnet-cloud")["spec"]["template"]["spec"],
        **{e.node: k8s_find("Deployment", f"mistnet-edge-{e.node}")["spec"]["template"]["spec"] for e in spec.edges},
    }
    for user, pod in pods.items():
        c = pod["containers"][0]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        credentials = PurePosixPath(option(c["args"], "--credentials"))
        secret = volumes[mounts[str(credentials.parent)]]["secret"]["secretName"]
        assert generated[secret]["files"] == [f"{credentials.name}=broker-auth/credentials/{user}.env"]
        if user == cloud_user:
            assert pod["nodeName"] == spec.cloud.node
            job_file = PurePosixPath(option(c["args"], "--job"))
            assert volumes[mounts[str(job_file.parent)]]["configMap"]["name"] == "mistnet-job"
            assert job_file.name in cm["data"]
            assert spec.cloud.output and volumes[mounts[str(PurePosixPath(spec.cloud.output).parent)]]["hostPath"]
            assert volumes[mounts[str(PurePosixPath(spec.model.pretrained).parent)]]["hostPath"]
            assert c["resources"]["limits"]["memory"] == "8Gi"
        else:
            assert pod["nodeName"] == option(c["args"], "--node") == user
            dataset = next(e.dataset for e in spec.edges if e.node == user)
            assert volumes[mounts[dataset]]["hostPath"] == {"path": dataset, "type": "Directory"}
            assert c["resources"]["limits"]["memory"] == "2Gi"
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["envFrom"] == [{"secretRef": {"name": "mistnet-s3", "optional": True}}]
        assert pod["securityContext"]["runAsNonRoot"] is True


def test_kubernetes_job_is_the_sedna_example_and_valid():
    text = k8s_find("ConfigMap", "mistnet-job")["data"]["job.yaml"]
    assert text == SEDNA_JOB.read_text()
    loaded = parse_job_text(text, "deploy/k8s/job-configmap.yaml")
    assert loaded.form == "sedna"
    assert loaded.spec == job_spec()
    assert loaded.spec.cut_layer == 4 and loaded.spec.privacy.epsilon == 100
    assert [e.node for e in loaded.spec.edges] == ["edge1-node", "edge2-node"]
    conf = k8s_find("ConfigMap", "mosquitto-conf")["data"]["mosquitto.conf"]
    assert conf == BROKER_CONF.read_text()


def test_compose_broker_starts_a_real_mosquitto_with_init_auth_accounts(tmp_path):
    """start-mosquitto.sh with the secrets compose mounts, then broker/conf/mosquitto.conf."""
    mosquitto = find_mosquitto()
    if mosquitto is None:
        pytest.fail("mosquitto is not installed")
    spec = job_spec()
    port = free_port()
    bundle = init_auth(tmp_path / "broker-auth", [e.node for e in spec.edges], host="mosquitto", port=MQTT_PORT)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    shutil.copy(bundle.passwd, secrets / "mosquitto_passwd")
    shutil.copy(bundle.acl, secrets / "mosquitto_acl")
    etc, data = tmp_path / "etc", tmp_path / "data"
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(rewrite_config(BROKER_CONF.read_text(), port=port, private=True, settings={
        "password_file": str(etc / "passwd"), "acl_file": str(etc / "acl"),
        "persistence_location": f"{data}/"}))
    env = {**os.environ, "MISTNET_SECRETS_DIR": str(secrets), "MISTNET_BROKER_CONF_DIR": str(etc),
           "MISTNET_BROKER_DATA_DIR": str(data)}
    log = (tmp_path / "broker.log").open("wb")
    broker = subprocess.Popen(["sh", str(START_SCRIPT), mosquitto, "-c", str(conf)], env=env, stdout=log, stderr=log)
    try:
        wait_for_port("127.0.0.1", port, 10, broker)
        assert (etc / "passwd").read_bytes() == bundle.passwd.read_bytes()
        assert (etc / "passwd").stat().st_mode & 0o077 == 0
        health = yaml_docs(COMPOSE)[0]["services"]["mosquitto"]["healthcheck"]["test"][1]
        health = health.replace(f"-p {MQTT_PORT}", f"-p {port}").replace("$$", "$")
        assert subprocess.run(["sh", "-c", health], timeout=20).returncode == 0, "health check failed"
        for user in ("cloud", spec.edges[0].node):
            sub = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-u", user,
                                  "-P", bundle.passwords[user], "-t", f"mistnet/v1/node/{user}/status", "-E",
                                  "-W", "5", "-V", "5"], capture_output=True, text=True, timeout=20)
            assert sub.returncode == 0, f"{user}: {sub.stderr}"
        wrong = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-u", "cloud", "-P", "nope",
                                "-t", "x", "-E", "-W", "5"], capture_output=True, text=True, timeout=20)
        assert wrong.returncode != 0
    finally:
        broker.terminate()
        broker.wait(10)
        log.close()
    assert "Error" not in (tmp_path / "broker.log").read_text(), (tmp_path / "broker.log").read_text()

    missing = subprocess.run(["sh", str(START_SCRIPT), "true"], env={**env, "MISTNET_SECRETS_DIR": str(tmp_path)},
                             capture_output=True, text=True, timeout=20)
    assert missing.returncode == 1 and "init-auth" in missing.stderr


def test_kustomize_renders_base_and_gpu_component(tmp_path):
    """``kubectl kustomize`` of the manifests with init-auth secrets (and the gpu component).

    kubectl is not a project dependency: where it is absent this checks what the render would
    need (every referenced file exists) instead of rendering.
    """
    k8s = tmp_path / "k8s"
    shutil.copytree(K8S, k8s, ignore=shutil.ignore_patterns("broker-auth"))
    spec = job_spec()
    init_auth(k8s / "broker-auth", [e.node for e in spec.edges], host="192.0.2.10")
    base = yaml_docs(k8s / "kustomization.yaml")[0]
    for resource in base["resources"]:
        assert (k8s / resource).is_file(), resource
    for generator in base["secretGenerator"]:
        for item in generator["files"]:
            assert (k8s / item.split("=", 1)[1]).is_file(), item
    component = yaml_docs(k8s / "components" / "gpu" / "kustomization.yaml")[0]
    assert component["kind"] == "Component"
    assert all((k8s / "components" / "gpu" / p["path"]).is_file() for p in component["patches"])
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return
    overlay = tmp_path / "gpu"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text("resources: [../k8s]\ncomponents: [../k8s/components/gpu]\n")
    args = {}
    for name, root in (("base", k8s), ("gpu", overlay)):
        done = subprocess.run([kubectl, "kustomize", str(root)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        objects = [d for d in yaml.safe_load_all(done.stdout) if d]
        assert all(o["metadata"].get("namespace") == "mistnet" for o in objects if o["kind"] != "Namespace")
        kinds = sorted(o["kind"] for o in objects)
        assert kinds.count("Secret") == 5 and kinds.count("Deployment") == 3 and kinds.count("Job") == 1, kinds
        secrets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Secret"}
        assert set(secrets["mistnet-broker-auth"]["data"]) == {"passwd", "acl"}
        cloud = next(o for o in objects if o["kind"] == "Job")["spec"]["template"]["spec"]["containers"][0]
        device = option(cloud["args"], "--device")
        if name == "gpu":
            assert device == "cuda" and cloud["resources"]["limits"] == {"memory": "8Gi", "nvidia.com/gpu": 1}
            assert cloud["image"] == f"{CLOUD_IMAGE}:{VERSION}"
        else:
            assert device == "cpu" and cloud["image"] == f"{CLOUD_IMAGE}:{VERSION}-cpu"
        args[name] = [a for a in cloud["args"] if a != device]
    assert args["base"] == args["gpu"]  # the component changes the device and nothing else
