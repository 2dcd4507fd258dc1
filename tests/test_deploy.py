"""deploy/ and docs/user-guide.md: what an operator installs is valid and fits together.

The systemd unit is checked by systemd itself (``systemd-analyze verify`` and its
offline security rating), the sysusers and tmpfiles files by ``systemd-sysusers`` and
``systemd-tmpfiles`` on a scratch root; every Kubernetes manifest against the
Kubernetes API's JSON schema (``kubernetes-validate``, offline, strict: an unknown
field fails), and the ServiceMonitor, a CRD without a schema there, for the fields
the Prometheus Operator's CRD requires. Every shipped ``proxytap.toml`` goes through
``proxytap check-config``, and the paths, ports, names and labels the artifacts share
are held to each other. The PAC file is evaluated by pacparser (a real PAC engine).
The user guide's commands are parsed by proxytap's own parsers, and its analyzer
and module examples are run against a real proxy.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import sys
import textwrap
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pacparser
import pytest
import yaml

from proxytap import flowscli
from proxytap.cli import build_parser
from proxytap.config import from_dict, load
from proxytap.export import tapcli
from proxytap.intercept import cacli
from tests.conftest import PROXYTAP, Origin, curl, run, start_proxytap, wait_until

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SYSTEMD = DEPLOY / "systemd"
UNIT = SYSTEMD / "proxytap.service"
K8S = DEPLOY / "kubernetes"
BASE = K8S / "base"
CONTAINER = DEPLOY / "container"
GUIDE = ROOT / "docs" / "user-guide.md"
# the oldest Kubernetes release still widely run, and the newest the schemas know
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: run tests/setup-tools.sh (Debian package {package})")
    return path


# == systemd ================================================================================


def unit_settings(path: Path = UNIT) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file, every value of a key in order (comments skipped)."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key, []).append(value)
    return out


def exec_argv(settings: dict[str, list[str]], key: str = "ExecStart") -> list[str]:
    (line,) = settings[key]
    return shlex.split(line)


async def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """``systemd-analyze verify`` finds nothing to say about the unit.

    verify also requires ExecStart's program to exist and be executable. The unit
    names /opt/proxytap/venv/bin/proxytap, where its install steps put it; the copy
    checked here names this checkout's real proxytap program instead, and nothing
    else in it changes. verify reports unknown or malformed settings as warnings
    ("..., ignoring") with exit code 0, so the test wants no output at all.
    """
    analyze = _tool("systemd-analyze", "systemd")
    real = Path(sys.executable).parent / "proxytap"
    assert real.is_file() and os.access(real, os.X_OK), real
    text = UNIT.read_text()
    assert text.count("/opt/proxytap/venv/bin/proxytap") == 2  # ExecStart, ExecReload
    copy = tmp_path / "proxytap.service"
    copy.write_text(text.replace("/opt/proxytap/venv/bin/proxytap", str(real)))
    rc, out, err = await run(analyze, "verify", str(copy))
    assert rc == 0, (out, err)
    assert out.decode() + err.decode() == ""

    # the check bites: a misspelt value is reported
    broken = tmp_path / "broken.service"
    broken.write_text(copy.read_text().replace("ProtectSystem=strict", "ProtectSystem=strictly"))
    rc, out, err = await run(analyze, "verify", str(broken))
    assert "ignoring: strictly" in out.decode() + err.decode()


async def test_systemd_unit_security_rating(tmp_path: Path) -> None:
    """systemd's own offline review rates the sandbox 2.0 or better ("OK"; 1.4 when written).

    --threshold counts in tenths of the printed level (20: 2.0).
    """
    analyze = _tool("systemd-analyze", "systemd")
    rc, out, err = await run(
        analyze, "security", "--offline=yes", "--threshold=20", "--no-pager", str(UNIT)
    )
    assert rc == 0, (out.decode()[-2000:], err)
    assert "Overall exposure level for proxytap.service" in out.decode()


def test_systemd_unit_hardening_and_commands() -> None:
    s = unit_settings()
    for key, value in {
        "Type": "exec",  # proxytap does not implement sd_notify
        "User": "proxytap",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "CapabilityBoundingSet": "",
        "SystemCallErrorNumber": "EPERM",
        "Restart": "on-failure",
        "RestartPreventExitStatus": "2",
        "RuntimeDirectory": "proxytap",
        "StateDirectory": "proxytap",
        "LogsDirectory": "proxytap",
        "ConfigurationDirectory": "proxytap",
    }.items():
        assert s[key] == [value], (key, s.get(key))
    assert s["SystemCallFilter"][0] == "@system-service"
    assert int(s["LimitNOFILE"][0]) >= 65536

    # the commands are real proxytap command lines
    start = exec_argv(s)
    assert start[0] == "/opt/proxytap/venv/bin/proxytap"
    args = build_parser().parse_args(start[1:])
    assert args.command == "run" and args.config == "/etc/proxytap/proxytap.toml"
    check, hup = (shlex.split(v) for v in s["ExecReload"])
    assert check[1:] == ["check-config", "/etc/proxytap/proxytap.toml"]
    assert build_parser().parse_args(check[1:]).command == "check-config"
    assert hup[0] in ("/bin/kill", "/usr/bin/kill") and hup[1:] == ["-HUP", "$MAINPID"]


def _under(path: str | None, directory: str) -> bool:
    return path is not None and PurePosixPath(path).is_relative_to(directory)


def test_systemd_config_writes_only_where_the_unit_allows() -> None:
    """Under ProtectSystem=strict every path proxytap writes must be in a directory the
    unit makes writable; the config the unit starts is deploy/systemd/proxytap.toml."""
    s = unit_settings()
    cfg = load(SYSTEMD / "proxytap.toml")
    run_dir = "/run/" + s["RuntimeDirectory"][0]
    state_dir = "/var/lib/" + s["StateDirectory"][0]
    logs_dir = "/var/log/" + s["LogsDirectory"][0]
    assert s["WorkingDirectory"] == [state_dir]
    assert _under(cfg.export.sftap_home, run_dir)
    assert cfg.export.sftap_mode == 0o660  # analyzers connect as members of the group
    assert _under(cfg.tls.ca_dir, state_dir)
    assert _under(cfg.log.flows, logs_dir)
    assert cfg.log.flows_max_bytes > 0  # rotated by proxytap: nothing else rotates it
    assert all(_under(p, "/etc/" + s["ConfigurationDirectory"][0]) for p in cfg.modules.path)
    # the commented-out options name writable places too, once uncommented
    text = (SYSTEMD / "proxytap.toml").read_text()
    assert '# dir = "/var/log/proxytap/pcap"' in text
    pcap_rule = (SYSTEMD / "proxytap.tmpfiles").read_text()
    assert "/var/log/proxytap/pcap" in pcap_rule
    # no loopback7 into /tmp: the unit's /tmp is private
    assert "/tmp/" not in "".join(ln for ln in text.splitlines() if "loopback7 =" in ln)


async def test_systemd_sysusers_creates_the_unit_user(tmp_path: Path) -> None:
    sysusers = _tool("systemd-sysusers", "systemd")
    conf = tmp_path / "usr/lib/sysusers.d/proxytap.conf"
    conf.parent.mkdir(parents=True)
    (tmp_path / "etc").mkdir()
    shutil.copy(SYSTEMD / "proxytap.sysusers", conf)
    rc, out, err = await run(sysusers, "--dry-run", f"--root={tmp_path}", "proxytap.conf")
    text = out.decode() + err.decode()
    assert rc == 0, text
    user = unit_settings()["User"][0]
    assert f"Creating user '{user}'" in text
    assert f"Creating group '{unit_settings()['Group'][0]}'" in text


async def test_systemd_tmpfiles_deletes_old_pcap_files_only(tmp_path: Path) -> None:
    tmpfiles = _tool("systemd-tmpfiles", "systemd")
    conf = tmp_path / "etc/tmpfiles.d/proxytap.conf"
    conf.parent.mkdir(parents=True)
    shutil.copy(SYSTEMD / "proxytap.tmpfiles", conf)
    pcap = tmp_path / "var/log/proxytap/pcap"
    pcap.mkdir(parents=True)
    old, new = pcap / "proxytap-old.pcap", pcap / "proxytap-new.pcap"
    old.write_bytes(b"x")
    new.write_bytes(b"x")
    eight_days = 8 * 86400
    st = old.stat()
    os.utime(old, (st.st_atime - eight_days, st.st_mtime - eight_days))
    rc, out, err = await run(tmpfiles, "--clean", f"--root={tmp_path}", "proxytap.conf")
    assert rc == 0, (out, err)
    assert not old.exists()
    assert new.exists()


async def test_systemd_config_runs(tmp_path: Path, origin: Origin) -> None:
    """The unit's config, its directories moved under tmp_path and its addresses to
    loopback port 0, runs: it proxies, serves flow sockets 0660 and writes the flow log."""
    text = (SYSTEMD / "proxytap.toml").read_text()
    for directory in ("/run/proxytap", "/var/lib/proxytap", "/var/log/proxytap", "/etc/proxytap"):
        text = text.replace(directory, str(tmp_path / directory.strip("/").replace("/", "_")))
    text = re.sub(r'address = "0\.0\.0\.0:\d+"', 'address = "127.0.0.1:0"', text)
    text = text.replace('address = "127.0.0.1:9090"', 'address = "off"')
    config = tmp_path / "proxytap.toml"
    config.write_text(text)
    for made_by_systemd in ("run_proxytap", "var_lib_proxytap", "var_log_proxytap"):
        (tmp_path / made_by_systemd).mkdir(mode=0o750)
    proc, ports, lines = await start_proxytap(
        "--config", str(config), "--allow-dest", "127.0.0.0/8"
    )
    try:
        assert set(ports) == {"http", "socks"}, lines
        rc, body, err = await curl("-x", f"http://127.0.0.1:{ports['http']}", f"{origin.url}/hello")
        assert rc == 0 and body == b"hello GET /hello", err
        home = tmp_path / "run_proxytap" / "sf-tap"
        sock = home / "tcp" / "http"
        assert sock.is_socket()
        assert sock.stat().st_mode & 0o777 == 0o660
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    flows = tmp_path / "var_log_proxytap" / "flows.json"
    (record,) = [json.loads(ln) for ln in flows.read_text().splitlines()]
    assert record["id.resp_p"] == origin.port


# == shipped configs ========================================================================


def configmap_toml() -> str:
    doc = yaml.safe_load((BASE / "configmap.yaml").read_text())
    text: str = doc["data"]["proxytap.toml"]
    return text


@pytest.mark.parametrize(
    "name", ["systemd/proxytap.toml", "container/proxytap.toml", "kubernetes/base/configmap.yaml"]
)
async def test_shipped_configs_pass_check_config(name: str, tmp_path: Path) -> None:
    path = DEPLOY / name
    if path.suffix == ".yaml":
        path = tmp_path / "proxytap.toml"
        path.write_text(configmap_toml())
    rc, out, err = await run(*PROXYTAP, "check-config", str(path))
    assert rc == 0, err
    assert out.decode().strip() == f"{path}: ok"


def test_shipped_configs_are_not_open_proxies() -> None:
    """Every shipped config names its clients (no 0.0.0.0/0), and the Kubernetes one
    takes the real client from the load balancer's PROXY header."""
    configs = {
        "systemd": load(SYSTEMD / "proxytap.toml"),
        "container": load(CONTAINER / "proxytap.toml"),
        "kubernetes": from_dict(tomllib.loads(configmap_toml())),
    }
    for name, cfg in configs.items():
        assert cfg.access.clients, name
        assert not {"0.0.0.0/0", "::/0"} & set(cfg.access.clients), name
    for lst in configs["kubernetes"].listeners:
        assert lst.proxy_protocol and lst.proxy_protocol_from, lst


# == container ==============================================================================


def containerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Containerfile, continuation lines joined."""
    text = (CONTAINER / "Containerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerignore_allows(path: str) -> bool:
    """``path`` is in the build context under .dockerignore's rules (last match wins)."""
    allowed = True
    for rule in (ROOT / ".dockerignore").read_text().splitlines():
        rule = rule.strip()
        if not rule or rule.startswith("#"):
            continue
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/")
        if pattern == "*" or path == pattern or path.startswith(pattern + "/"):
            allowed = negate
    return allowed


def test_containerfile_builds_from_what_the_checkout_has() -> None:
    steps = containerfile()
    froms = [args for op, args in steps if op == "FROM"]
    assert froms and all(f.startswith("python:3.12-slim") for f in froms)
    copies = [shlex.split(args) for op, args in steps if op == "COPY"]
    sources: list[str] = []
    for argv in copies:
        if argv[0].startswith("--from"):
            continue
        sources += argv[:-1]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), src
        assert dockerignore_allows(src.rstrip("/")), f"{src} is excluded by .dockerignore"
    # pip install . needs the project file, the readme it names and the package
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert {"pyproject.toml", project["project"]["readme"], "proxytap"} <= {
        s.rstrip("/").removeprefix("./") for s in sources
    }
    assert not dockerignore_allows(".venv")


def test_container_image_runs_its_config() -> None:
    steps = containerfile()
    ops = dict(steps)  # the last of each instruction
    user = ops["USER"]
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user), "a numeric, non-root user"
    entry = json.loads(ops["ENTRYPOINT"])
    cmd = json.loads(ops["CMD"])
    assert entry == ["proxytap"]
    args = build_parser().parse_args(cmd)
    assert args.command == "run"
    # the CMD's config is the one COPY puts there
    copied = {
        shlex.split(a)[-1]: shlex.split(a)[0]
        for op, a in steps
        if op == "COPY" and not a.startswith("--from")
    }
    assert copied[args.config] == "deploy/container/proxytap.toml"
    cfg = load(CONTAINER / "proxytap.toml")
    exposed = {int(p.split("/")[0]) for p in ops["EXPOSE"].split()}
    assert {lst.port for lst in cfg.listeners} | {cfg.admin.port} == exposed
    health = ops["HEALTHCHECK"]
    assert f"http://127.0.0.1:{cfg.admin.port}/healthz" in health
    volumes = json.loads(ops["VOLUME"])
    assert any(_under(cfg.export.sftap_home, v) for v in volumes)
    assert any(_under(cfg.tls.ca_dir, v) for v in volumes)
    assert all(_under(p, "/etc/proxytap") for p in cfg.modules.path)
    # the same ids as the Kubernetes pods
    pod = k8s_docs(BASE / "deployment.yaml")[0]["spec"]["template"]["spec"]
    uid, gid = (int(x) for x in user.split(":"))
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (
        uid,
        gid,
    )


# == Kubernetes =============================================================================


def k8s_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def base_resources() -> dict[str, dict[str, Any]]:
    """kind/name -> manifest, of every resource the base kustomization lists."""
    kust = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    out = {}
    for name in kust["resources"]:
        for doc in k8s_docs(BASE / name):
            out[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return out


def test_kustomizations_name_what_is_there() -> None:
    kust = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    assert kust["kind"] == "Kustomization"
    listed = set(kust["resources"])
    assert listed == {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert not (K8S / "base" / "secret-ca.yaml").exists()  # the template stays out
    overlay = yaml.safe_load((K8S / "analyzer" / "kustomization.yaml").read_text())
    assert overlay["resources"] == ["../base"]
    for patch in overlay["patches"]:
        assert (K8S / "analyzer" / patch["path"]).is_file()
    images = {i["name"] for i in kust["images"]}
    deployment = base_resources()["Deployment/proxytap"]
    for container in deployment["spec"]["template"]["spec"]["containers"]:
        assert container["image"].split(":")[0] in images


def with_sidecar(deployment: dict[str, Any]) -> dict[str, Any]:
    """The base Deployment with analyzer/sidecar.yaml merged as kustomize merges it
    (strategic merge: containers and volumes by name)."""
    (patch,) = k8s_docs(K8S / "analyzer" / "sidecar.yaml")
    assert (patch["kind"], patch["metadata"]["name"]) == ("Deployment", "proxytap")
    merged = json.loads(json.dumps(deployment))
    spec = merged["spec"]["template"]["spec"]
    for key in ("containers", "volumes"):
        by_name = {c["name"]: c for c in spec.get(key, [])}
        for item in patch["spec"]["template"]["spec"].get(key, []):
            assert item["name"] not in by_name, f"the patch replaces {key} {item['name']}"
            spec.setdefault(key, []).append(item)
    return merged


def manifests_to_validate() -> Iterator[tuple[str, dict[str, Any]]]:
    for name, doc in base_resources().items():
        if doc["apiVersion"] != "monitoring.coreos.com/v1":
            yield name, doc
    (secret,) = k8s_docs(K8S / "secret-ca.yaml")
    yield "secret-ca.yaml", secret
    yield "analyzer overlay", with_sidecar(base_resources()["Deployment/proxytap"])


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_against_the_kubernetes_schema(version: str) -> None:
    names = []
    for name, doc in manifests_to_validate():
        kubernetes_validate.validate(doc, version, strict=True)
        names.append(name)
    assert len(names) == 6, names  # ConfigMap, Deployment, 2 Services, Secret, overlay

    # the validator bites: an unknown field, a wrong type
    doc = json.loads(json.dumps(base_resources()["Deployment/proxytap"]))
    doc["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRoot"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, version, strict=True)
    doc = json.loads(json.dumps(base_resources()["Deployment/proxytap"]))
    doc["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, version, strict=True)


def test_servicemonitor_has_what_the_operator_requires() -> None:
    """The Prometheus Operator's ServiceMonitor CRD (monitoring.coreos.com/v1) requires
    spec.selector and spec.endpoints; each endpoint here names a port of the Service it
    selects, and the token Secret the pods use."""
    res = base_resources()
    (monitor,) = [d for d in res.values() if d["kind"] == "ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", monitor["metadata"]["name"])
    spec = monitor["spec"]
    assert set(spec) <= {"selector", "endpoints", "jobLabel", "namespaceSelector"}
    selected = [
        d
        for d in res.values()
        if d["kind"] == "Service"
        and spec["selector"]["matchLabels"].items() <= d["metadata"]["labels"].items()
    ]
    assert [s["metadata"]["name"] for s in selected] == ["proxytap-admin"]
    port_names = {p["name"] for p in selected[0]["spec"]["ports"]}
    assert spec["endpoints"]
    for ep in spec["endpoints"]:
        assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "authorization"}
        assert ep["port"] in port_names
        assert ep["path"] == "/metrics"
        assert re.fullmatch(r"[0-9]+(ms|s|m|h)", ep["interval"])
        auth = ep["authorization"]
        assert auth["type"] == "Bearer"
        assert set(auth["credentials"]) == {"name", "key"}
        env = res["Deployment/proxytap"]["spec"]["template"]["spec"]["containers"][0]["env"]
        (token,) = [e for e in env if e["name"] == "PROXYTAP_ADMIN_TOKEN"]
        assert token["valueFrom"]["secretKeyRef"] == {
            "name": auth["credentials"]["name"],
            "key": auth["credentials"]["key"],
        }


def test_manifests_fit_together() -> None:
    """Names, ports, labels and paths that the manifests and the config share."""
    res = base_resources()
    deployment = res["Deployment/proxytap"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    spec = pod["spec"]
    (proxy,) = [c for c in spec["containers"] if c["name"] == "proxytap"]
    container_ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}

    # the config the container starts is the ConfigMap's, at the path it is mounted
    args = build_parser().parse_args(proxy["args"])
    mounts = {m["name"]: m for m in proxy["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert set(mounts) <= set(volumes)
    config_mount = mounts["config"]
    assert "subPath" not in config_mount  # so that an applied change reaches the pod
    configmap = res["ConfigMap/" + volumes["config"]["configMap"]["name"]]
    assert PurePosixPath(args.config).parent == PurePosixPath(config_mount["mountPath"])
    assert PurePosixPath(args.config).name in configmap["data"]
    cfg = from_dict(tomllib.loads(configmap["data"]["proxytap.toml"]))

    # listeners and admin on the ports the pod declares and the Services target
    for lst in cfg.listeners:
        assert lst.host == "0.0.0.0"
        assert container_ports[lst.name] == lst.port
    assert cfg.admin.host == "0.0.0.0" and container_ports["admin"] == cfg.admin.port
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert proxy[probe]["httpGet"] == {"path": path, "port": "admin"}
    for service in (d for d in res.values() if d["kind"] == "Service"):
        assert service["spec"]["selector"].items() <= labels.items()
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in container_ports
    lb = res["Service/proxytap"]
    assert lb["spec"]["type"] == "LoadBalancer"
    annotations = lb["metadata"]["annotations"]
    assert annotations["service.beta.kubernetes.io/aws-load-balancer-proxy-protocol"] == "*"
    assert {p["targetPort"] for p in lb["spec"]["ports"]} == {lst.name for lst in cfg.listeners}

    # the CA: from the Secret to a writable tls.ca_dir (ca_init_copies_the_key below)
    (secret,) = k8s_docs(K8S / "secret-ca.yaml")
    assert volumes["ca-secret"]["secret"]["secretName"] == secret["metadata"]["name"]
    assert "proxytap-ca.pem" in secret["stringData"]  # the file name proxytap ca init writes
    assert "emptyDir" in volumes["ca"]
    assert mounts["ca"]["mountPath"] == cfg.tls.ca_dir and not mounts["ca"].get("readOnly")
    (init,) = spec["initContainers"]
    init_mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    assert init_mounts["ca"] == cfg.tls.ca_dir
    assert init["image"] == proxy["image"]
    # the flow sockets on the emptyDir
    assert "emptyDir" in volumes["flows"]
    assert _under(cfg.export.sftap_home, mounts["flows"]["mountPath"])

    # hardening
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["automountServiceAccountToken"] is False
    sc = proxy["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "memory" in proxy["resources"]["limits"]
    grace = cfg.timeouts.shutdown_grace
    assert spec["terminationGracePeriodSeconds"] > grace + 5  # preStop pause + drain

    # the sidecar reads the same emptyDir, where the sockets are
    merged = with_sidecar(deployment)["spec"]["template"]["spec"]
    (analyzer,) = [c for c in merged["containers"] if c["name"] == "analyzer"]
    (flows,) = [m for m in analyzer["volumeMounts"] if m["name"] == "flows"]
    assert flows["mountPath"] == mounts["flows"]["mountPath"]
    assert f"{cfg.export.sftap_home}/tcp/http" in " ".join(analyzer["args"])
    assert analyzer["securityContext"]["runAsUser"] != spec["securityContext"]["runAsUser"]
    assert cfg.export.sftap_mode & 0o060 == 0o060  # the group (fsGroup) may connect


async def test_ca_init_container_copies_the_key(tmp_path: Path) -> None:
    """The init container's script, run by sh with its two mounts moved under tmp_path:
    the key lands in tls.ca_dir, mode 0600, and a missing (optional) Secret is no error."""
    spec = base_resources()["Deployment/proxytap"]["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    assert init["command"] == ["sh", "-c"]
    (script,) = init["args"]
    mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    secret, ca_dir = tmp_path / "secret", tmp_path / "ca"
    secret.mkdir()
    ca_dir.mkdir()
    script = script.replace(mounts["ca-secret"], str(secret)).replace(mounts["ca"], str(ca_dir))
    rc, _, err = await run("sh", "-c", script)  # no Secret
    assert rc == 0, err
    assert list(ca_dir.iterdir()) == []
    (secret / "proxytap-ca.pem").write_bytes(b"key and certificate")
    (secret / "proxytap-ca.pem").chmod(0o440)
    rc, _, err = await run("sh", "-c", script)
    assert rc == 0, err
    key = ca_dir / "proxytap-ca.pem"
    assert key.read_bytes() == b"key and certificate"
    assert key.stat().st_mode & 0o777 == 0o600


# == HAProxy ===============================================================================


async def test_haproxy_config_checks_and_targets_the_listener_ports() -> None:
    """``haproxy -c`` on the shipped file as it is (tests/front/test_haproxy.py runs it with
    loopback addresses); its servers are proxytap's HTTP and SOCKS ports, its health
    checks the admin port, and every server sends the PROXY protocol."""
    haproxy = _tool("haproxy", "haproxy")
    path = DEPLOY / "haproxy" / "haproxy.cfg"
    rc, out, err = await run(haproxy, "-c", "-f", str(path))
    assert rc == 0, (out, err)
    assert "Configuration file is valid" in out.decode() + err.decode()
    servers = re.findall(r"^\s*server \S+ \S+:(\d+) (.*)$", path.read_text(), re.M)
    assert servers
    cfg = load(SYSTEMD / "proxytap.toml")
    ports = {lst.port for lst in cfg.listeners}
    for port, options in servers:
        assert int(port) in ports
        assert "send-proxy-v2" in options.split()
        assert f"check port {cfg.admin.port}" in options


# == PAC ====================================================================================


def test_pac_file_sends_the_web_through_proxytap() -> None:
    pacparser.init()
    try:
        pacparser.parse_pac_file(str(DEPLOY / "proxytap.pac"))
        via_proxy = "PROXY proxy.example.internal:8080; SOCKS5 proxy.example.internal:1080"
        assert pacparser.find_proxy("https://example.org/", "example.org") == via_proxy
        assert pacparser.find_proxy("http://203.0.113.7/x", "203.0.113.7") == via_proxy
        for url, host in (
            ("http://intranet/", "intranet"),
            ("https://wiki.example.internal/", "wiki.example.internal"),
            ("http://localhost:8000/", "localhost"),
            ("http://10.1.2.3/", "10.1.2.3"),
            ("http://192.168.1.1/", "192.168.1.1"),
        ):
            assert pacparser.find_proxy(url, host) == "DIRECT", host
    finally:
        pacparser.cleanup()
    # the ports are the listeners' defaults (and the shipped configs')
    assert {lst.port for lst in load(SYSTEMD / "proxytap.toml").listeners} == {8080, 1080}


# == the user guide =========================================================================


def code_blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(), re.S)


def documented_commands() -> list[tuple[str, list[str]]]:
    out = []
    for path in (GUIDE, DEPLOY / "README.md"):
        for block in code_blocks(path, "sh"):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split("  #")[0].strip()
                for part in re.split(r"\s(?:&&|\|)\s", line):
                    words = shlex.split(part, comments=True)
                    for i, w in enumerate(words):
                        # the command word: first, after `runuser -u USER --`, or a path
                        if w.endswith("/bin/proxytap") or (
                            w == "proxytap" and (i == 0 or words[i - 1] == "--")
                        ):
                            out.append((path.name, words[i + 1 :]))
                            break
    return out


def test_documented_commands_parse() -> None:
    """Every ``proxytap ...`` in the guide's and deploy/README.md's shell blocks is a
    command line proxytap's own parsers accept."""
    commands = documented_commands()
    seen = set()
    for where, argv in commands:
        sub = argv[0]
        seen.add(sub)
        if sub in ("run", "check-config"):
            build_parser().parse_args(argv)
        elif sub == "ca":
            cacli._parser().parse_args(argv[1:])
        elif sub == "tap":
            tapcli._parser().parse_args(argv[1:])
        elif sub == "flows":
            flowscli._parser().parse_args(argv[1:])
        else:
            pytest.fail(f"{where}: proxytap {sub}: no such command")
    assert seen == {"run", "check-config", "ca", "tap", "flows"}, seen


def test_documented_config_snippets_load(tmp_path: Path) -> None:
    """The guide's TOML blocks are valid proxytap config (the module chain one too,
    with its module in place)."""
    blocks = code_blocks(GUIDE, "toml")
    assert len(blocks) >= 3
    (module,) = [b for b in code_blocks(GUIDE, "python") if "def create(" in b]
    (tmp_path / "deny_hosts.py").write_text(module)
    for block in blocks:
        data = tomllib.loads(block)
        if "modules" in data:
            data["modules"]["path"] = [str(tmp_path)]
        from_dict(data)


async def test_guide_analyzer_reads_a_real_flow(tmp_path: Path, origin: Origin) -> None:
    (analyzer,) = [b for b in code_blocks(GUIDE, "python") if "AF_UNIX" in b]
    script = tmp_path / "analyzer.py"
    script.write_text(analyzer)
    home = tmp_path / "sf-tap"
    proc, ports, lines = await start_proxytap(
        "--http", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--sftap-home", str(home),
        "--allow-dest", "127.0.0.0/8",
    )  # fmt: skip
    reader = None
    try:
        admin = _admin_url(lines)
        reader = await asyncio.create_subprocess_exec(
            sys.executable, str(script), str(home / "tcp" / "http"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip

        def connected() -> bool:
            with urllib.request.urlopen(f"{admin}/subscribers", timeout=5) as resp:
                subs = json.load(resp)["subscribers"]
            return any(s["connected"] for s in subs if s["kind"] == "sftap")

        await wait_until(connected, within=10, what="the analyzer connected")
        rc, body, err = await curl("-x", f"http://127.0.0.1:{ports['http']}", f"{origin.url}/hello")
        assert rc == 0 and body == b"hello GET /hello", err
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 20)
    assert reader is not None
    out, err = await asyncio.wait_for(reader.communicate(), 20)  # ends with the stream
    assert reader.returncode == 0, err
    events = [ln.split() for ln in out.decode().splitlines()]
    assert events[0][4] == "CREATED"
    assert events[-1][4] == "DESTROYED"
    data = [e for e in events if e[4] == "DATA"]
    assert data and all(int(e[5]) > 0 for e in data)
    assert str(origin.port) in {events[0][1], events[0][3]}


def _admin_url(lines: list[str]) -> str:
    for line in lines:
        if m := re.search(r"admin: serving (http://\S+)/metrics", line):
            return m.group(1)
    raise AssertionError(f"no admin line in {lines}")


async def test_guide_module_refuses_its_hosts(tmp_path: Path, origin: Origin) -> None:
    (module,) = [b for b in code_blocks(GUIDE, "python") if "def create(" in b]
    (tmp_path / "deny_hosts.py").write_text(module)
    config = tmp_path / "proxytap.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [[listeners]]
            name = "http"
            kind = "http"
            address = "127.0.0.1:0"
            client_to_server = ["validate", "rewrite", "deny_hosts"]

            [access]
            allow_dest = ["127.0.0.0/8"]
            connect_ports = [{origin.port}]

            [modules]
            path = [{json.dumps(str(tmp_path))}]

            [modules.options.deny_hosts]
            hosts = ["LOCALHOST"]

            [admin]
            address = "off"
            """
        )
    )
    rc, _out, err = await run(*PROXYTAP, "check-config", str(config))
    assert rc == 0, err
    proc, ports, _ = await start_proxytap("--config", str(config))
    try:
        proxy = f"http://127.0.0.1:{ports['http']}"
        blocked = f"http://localhost:{origin.port}/hello"
        rc, body, err = await curl("-x", proxy, "-w", "\n%{http_code}", blocked)
        assert body.decode().splitlines()[-1] == "403", (body, err)
        assert b"localhost is blocked here" in body
        rc, body, err = await curl("-p", "-x", proxy, "-w", "\n%{http_code}", blocked)
        assert rc != 0 and b"403" in err, (body, err)  # CONNECT refused
        rc, body, err = await curl("-x", proxy, f"{origin.url}/hello")  # 127.0.0.1: allowed
        assert rc == 0 and body == b"hello GET /hello", err
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 20)
