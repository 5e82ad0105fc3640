"""Every deploy file against the real CLI and settings: commands, options, variables, ports and names agree.

Nothing here builds an image or starts a cluster; it catches what goes stale when the code moves on:
a renamed option, a removed setting, a probe on a port nobody listens on, a torch the tests never ran.
"""

import configparser
import re
import shlex
from pathlib import Path

import click
import pytest
import yaml

from listener.cli.main import cli
from listener.settings import Settings
from training.limits import ENV_PREFIX, Limits

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
COMPOSE = DEPLOY / "docker" / "compose.yaml"
KUBERNETES = DEPLOY / "kubernetes" / "listener-deployment.yaml"
SECRET = DEPLOY / "kubernetes" / "secret.example.yaml"
UNIT = DEPLOY / "systemd" / "mongotune-listener.service"
ENV_EXAMPLE = DEPLOY / "systemd" / "listener.env.example"
INTERNAL = {"private_roots"}  # set by the listener itself, never by an operator
VARIABLE = re.compile(r"\bMONGOTUNE_[A-Z0-9_]+\b")


def known_variables() -> set[str]:
    names = (set(Settings.model_fields) | set(Limits.model_fields)) - INTERNAL - {"limits"}
    return {ENV_PREFIX + name.upper() for name in names}


def check_variables(names, where: str) -> None:
    unknown = set(names) - known_variables()
    assert not unknown, f"{where} sets {sorted(unknown)}, which no setting or cap reads"


def check_setting_values(environment: dict, where: str) -> None:
    """Literal values (not `${...}` substitutions) must load as settings, as the daemon would load them."""
    literal = {k: str(v) for k, v in environment.items() if k.startswith(ENV_PREFIX) and "${" not in str(v)}
    Settings.load({}, literal)  # raises SettingsError naming the variable


def check_command(argv: list[str], where: str) -> None:
    """`listener ...` names existing (sub)commands and only their options."""
    assert Path(argv[0]).name == "listener", f"{where}: {argv} does not run the listener"
    command, rest = cli, list(argv[1:])
    while isinstance(command, click.Group):
        assert rest and rest[0] in command.commands, f"{where}: no command {rest[:1]} in `{command.name}`"
        command = command.commands[rest.pop(0)]
    options = {opt for param in command.params for opt in [*param.opts, *param.secondary_opts]} | {"--help", "-h"}
    for word in rest:
        if word.startswith("-"):
            assert word.split("=")[0] in options, f"{where}: `{command.name}` has no option {word}"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def exec_form(arguments: str) -> list[str]:
    return yaml.safe_load(arguments)  # a JSON array is YAML too


def dockerfile() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for instruction, arguments in dockerfile_instructions():
        found.setdefault(instruction, []).append(arguments)
    return found


def image_entrypoint() -> list[str]:
    return exec_form(dockerfile()["ENTRYPOINT"][-1])


def locked_torch() -> str:
    """The lock's torch, without its build label: the image takes that version from its own index."""
    return re.search(r"^(torch==[^+\s]+)", (ROOT / "requirements.lock").read_text(), re.MULTILINE).group(1)


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def listeners() -> dict[str, dict]:
    return {name: service for name, service in compose()["services"].items() if name.startswith("listener")}


def deployment() -> dict:
    return next(d for d in yaml.safe_load_all(KUBERNETES.read_text()) if d and d.get("kind") == "Deployment")


def container() -> dict:
    return deployment()["spec"]["template"]["spec"]["containers"][0]


def env_example() -> dict[str, str]:
    """Every NAME=value line, commented out or not: a commented example must be right once uncommented."""
    found = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.match(r"^#?([A-Z][A-Z0-9_]*)=(.*)$", line.strip())
        if match:
            found[match.group(1)] = match.group(2)
    return found


def test_the_image_runs_listener_start_and_checks_its_own_daemon():
    instructions = dockerfile()
    check_command(image_entrypoint() + exec_form(instructions["CMD"][-1]), "Dockerfile CMD")
    healthcheck = shlex.split(instructions["HEALTHCHECK"][-1])
    check_command(exec_form(" ".join(healthcheck[healthcheck.index("CMD") + 1:])), "Dockerfile HEALTHCHECK")
    environment = dict(re.findall(r"(\w+)=(\S+)", " ".join(instructions["ENV"])))
    check_variables(VARIABLE.findall(" ".join(instructions["ENV"])), "Dockerfile ENV")
    check_setting_values(environment, "Dockerfile ENV")
    assert instructions["STOPSIGNAL"] == ["SIGTERM"]
    ignored = set((DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines())
    assert {".git", ".venv", ".mongosh"} <= ignored, "the build context never copies local installs into the image"


def test_the_image_pins_the_torch_the_tests_run():
    args = dict(arg.split("=", 1) for arg in dockerfile()["ARG"] if "=" in arg)
    assert args["TORCH"] == locked_torch()
    assert args["TORCH_INDEX_URL"].endswith("/cpu"), "the default build is the CPU one"
    installs = " ".join(dockerfile()["RUN"])
    assert '"${TORCH}"' in installs and "PIP_CONSTRAINT" in installs, "the project install may not swap torch"
    assert "requirements.lock" in installs, "the image installs the versions the tests run"


def test_compose_has_a_cpu_and_a_gpu_profile_of_one_listener():
    services = listeners()
    profiles = {profile for service in services.values() for profile in service["profiles"]}
    assert profiles == {"cpu", "gpu"}
    gpu = [s for s in services.values() if "gpu" in s["profiles"]]
    cpu = [s for s in services.values() if "cpu" in s["profiles"]]
    assert len(gpu) == len(cpu) == 1
    assert "deploy" in gpu[0] and "deploy" not in cpu[0], "only the GPU profile reserves GPUs"
    assert "profiles" not in compose()["services"]["mongo"], "MongoDB starts with either profile"


@pytest.mark.parametrize("name", ["listener-cpu", "listener-gpu"])
def test_each_compose_listener_agrees_with_the_cli_and_the_image(name):
    service = listeners()[name]
    assert (COMPOSE.parent / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert set(service["build"].get("args", {})) <= {arg.split("=")[0] for arg in dockerfile()["ARG"]}
    check_command(image_entrypoint() + service["command"], f"compose {name} command")
    check_command(service["healthcheck"]["test"][1:], f"compose {name} healthcheck")
    check_variables([k for k in service["environment"] if k.startswith(ENV_PREFIX)], f"compose {name}")
    check_setting_values(service["environment"], f"compose {name}")
    port = service["environment"]["MONGOTUNE_METRICS_PORT"]
    assert [p for p in service["ports"] if p.endswith(f":{port}")], f"compose {name} publishes the metrics port"
    assert f"EXPOSE {port}" in DOCKERFILE.read_text()
    assert service["depends_on"]["mongo"]["condition"] == "service_healthy"


def test_compose_mounts_the_mongosh_scripts_that_exist():
    mounts = [v.split(":") for v in compose()["services"]["mongo"]["volumes"] if v.startswith(".")]
    assert [(COMPOSE.parent / source).resolve() for source, *_ in mounts] == [DEPLOY / "mongosh"]


def test_kubernetes_probes_use_the_health_check_of_the_pods_daemon():
    spec = container()
    check_command(image_entrypoint() + spec["args"], "Kubernetes args")
    check_command(spec["livenessProbe"]["exec"]["command"], "Kubernetes livenessProbe")
    assert spec["livenessProbe"]["exec"]["command"][1:] == ["status", "--check"]
    readiness = spec["readinessProbe"]["httpGet"]
    ports = {port["name"]: port["containerPort"] for port in spec["ports"]}
    assert readiness["path"] == "/healthz" and readiness["port"] in ports
    environment = {e["name"]: e.get("value", "${secret}") for e in spec["env"]}
    check_variables([k for k in environment if k.startswith(ENV_PREFIX)], "Kubernetes env")
    check_setting_values(environment, "Kubernetes env")
    assert int(environment["MONGOTUNE_METRICS_PORT"]) == ports[readiness["port"]]
    annotations = deployment()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == environment["MONGOTUNE_METRICS_PORT"]
    assert environment["MONGOTUNE_METRICS_HOST"] == "0.0.0.0", "the kubelet probes the pod's address"
    grace = deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= 120, "a stopping listener needs time to save a checkpoint"


def test_kubernetes_reads_the_uri_from_the_example_secret():
    secret = yaml.safe_load(SECRET.read_text())
    keys = set(secret["stringData"]) | {"hf_token"}  # hf_token is optional and commented out in the example
    for variable in container()["env"]:
        ref = variable.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["name"] == secret["metadata"]["name"] and ref["key"] in keys, variable["name"]
    assert "/" in secret["stringData"]["uri"].split("@")[-1].split("?")[0], "the URI names its database"


def test_the_systemd_unit_runs_listener_start_with_its_environment_file():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read_string(UNIT.read_text())
    service = unit["Service"]
    check_command(shlex.split(service["ExecStart"]), "systemd ExecStart")
    assert service["EnvironmentFile"] == "/etc/mongotune/listener.env"
    assert "/etc/mongotune/listener.env" in (DEPLOY / "README.md").read_text()
    assert service["KillSignal"] == "SIGTERM" and int(service["TimeoutStopSec"]) >= 120
    environment = env_example()
    assert environment["MONGOTUNE_HOME"] == f"/var/lib/{service['StateDirectory']}"
    check_variables([k for k in environment if k.startswith(ENV_PREFIX)], "listener.env.example")
    check_setting_values(environment, "listener.env.example")


def listener_commands(text: str) -> list[list[str]]:
    """Each `listener ...` in inline code or in a shell block, up to a shell operator or a comment."""
    spans = re.findall(r"`(listener [^`]+)`", text)
    spans += [line for block in re.findall(r"```sh\n(.*?)```", text, re.DOTALL) for line in block.splitlines()]
    found = []
    for span in spans:
        words = shlex.split(span.replace("$(", " ").replace(")", " "), comments=True)
        for start in [i for i, word in enumerate(words) if Path(word).name == "listener"]:
            command = []
            for word in words[start:]:
                if word in {"&&", "||", "|", ";"} or word.startswith(">"):
                    break
                command.append(word)
            found.append(command)
    return found


def test_every_cli_command_the_deploy_readme_shows_exists():
    commands = listener_commands((DEPLOY / "README.md").read_text())
    assert ["listener", "status", "--check"] in commands
    for command in commands:
        check_command(command, f"deploy/README.md: {' '.join(command)}")


def test_the_mongosh_scripts_document_what_they_read():
    readme = (DEPLOY / "README.md").read_text()
    for script in sorted((DEPLOY / "mongosh").glob("*.js")):
        text = script.read_text()
        for variable in sorted(set(re.findall(r"process\.env\.(\w+)", text))):
            assert variable in readme, f"{script.name} reads {variable}; deploy/README.md should say so"
        assert "db._" not in text, f"{script.name}: mongosh needs db.getCollection for names starting with _"
