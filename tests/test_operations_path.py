"""docs/operations.md's path from an empty cluster to a serving genserve, checked against the repo.

Every command of that section's shell blocks is parsed: files and folders of this repository it
names exist, `make` targets exist in the Makefile, `genserve` subcommands and options exist in the
CLI (click's own command tree, also inside `kubectl exec ... --`), `kubectl -k`/`kustomize`
folders hold a kustomization, and the path has every step the brief asks for. Commands that touch
a cluster or a registry are not run; what they name is."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import click
import pytest

from serve_app.cli import main as genserve_cli

REPO = Path(__file__).resolve().parents[1]
OPERATIONS = REPO / "docs" / "operations.md"
SECTION = "## From an empty cluster to a serving genserve"
# Repository folders: a token that starts with one of these names a repo path and must exist.
REPO_DIRS = ("kuberay/", "configs/", "docker/", "docs/", "scripts/", "serve_app/", "benchmarks/", "tests/")
OPERATORS = {"&&", "||", "|", ";", "&"}


def path_blocks(markdown: str = "") -> list[str]:
    """The ```bash blocks of the section (up to the next `## ` heading)."""
    text = markdown or OPERATIONS.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    body = text[start:end if end > 0 else None]
    return re.findall(r"```(?:bash|sh|console)\n(.*?)```", body, flags=re.S)


def commands(block: str) -> list[list[str]]:
    """Shell commands as token lists: continuation lines joined, comments dropped, split at
    `&&`, `||`, `|`, `;`, `&`, leading VAR=value assignments removed."""
    joined = re.sub(r"\\\n\s*", " ", block)
    out: list[list[str]] = []
    for line in joined.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        cmd: list[str] = []
        for tok in lexer:
            if tok in OPERATORS or tok == ">":
                out.append(cmd) if cmd else None
                cmd = []
                continue
            cmd.append(tok)
        if cmd:
            out.append(cmd)
    return [c for c in ([t for i, t in enumerate(c) if not _assignment_prefix(c, i)] for c in out) if c]


def _assignment_prefix(cmd: list[str], i: int) -> bool:
    return all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", t) for t in cmd[: i + 1])


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", (REPO / "Makefile").read_text(), flags=re.M))


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    seen: list[str] = field(default_factory=list)

    def need(self, ok: bool, what: str) -> None:
        if not ok:
            self.problems.append(what)


def _repo_path(tok: str) -> str | None:
    """`tok` (or the PATH of `key=PATH`/`--opt=PATH`) if it names something in this repository."""
    value = tok.split("=", 1)[1] if "=" in tok else tok
    return value if value.startswith(REPO_DIRS) or value in {"Makefile", "README.md", "pyproject.toml"} else None


def check_repo_paths(cmd: list[str], report: Report) -> None:
    for tok in cmd:
        path = _repo_path(tok)
        if path is not None:
            report.need((REPO / path).exists(), f"{' '.join(cmd)}: {path} does not exist in the repository")


def check_make(cmd: list[str], report: Report) -> None:
    targets = makefile_targets()
    goals = [t for t in cmd[1:] if not t.startswith("-") and "=" not in t]
    report.need(bool(goals), f"{' '.join(cmd)}: no make target")
    for goal in goals:
        report.need(goal in targets, f"{' '.join(cmd)}: no make target {goal!r} in the Makefile")


def check_genserve(cmd: list[str], report: Report) -> None:
    """Walk click's command tree: each word a subcommand of the group before it, each --option one
    the command declares, and the right number of arguments."""
    command: click.Command = genserve_cli
    args = cmd[1:]
    path = ["genserve"]
    while isinstance(command, click.Group) and args and not args[0].startswith("-"):
        sub = command.commands.get(args[0])
        if sub is None:
            report.need(False, f"{' '.join(cmd)}: `{' '.join(path)}` has no subcommand {args[0]!r} "
                               f"(has {sorted(command.commands)})")
            return
        command, path, args = sub, [*path, args.pop(0)], args
    if isinstance(command, click.Group):
        report.need(False, f"{' '.join(cmd)}: `{' '.join(path)}` is a group, not a command")
        return
    report.seen.append(" ".join(path))
    opts = {o: p for p in command.params if isinstance(p, click.Option) for o in (*p.opts, *p.secondary_opts)}
    positional = [p for p in command.params if isinstance(p, click.Argument)]
    given: list[str] = []
    i = 0
    while i < len(args):
        tok = args[i]
        if tok.startswith("-"):
            name = tok.split("=", 1)[0]
            opt = opts.get(name)
            if opt is None:
                report.need(False, f"{' '.join(cmd)}: `{' '.join(path)}` has no option {name!r} (has {sorted(opts)})")
                return
            if not opt.is_flag and "=" not in tok:
                i += 1  # its value
        else:
            given.append(tok)
        i += 1
    least = sum(max(p.nargs, 1) for p in positional if p.required)
    most = None if any(p.nargs < 0 for p in positional) else sum(p.nargs for p in positional)
    names = [p.name for p in positional]
    report.need(len(given) >= least, f"{' '.join(cmd)}: missing argument(s) of `{' '.join(path)}` {names}")
    report.need(most is None or len(given) <= most, f"{' '.join(cmd)}: `{' '.join(path)}` takes {names}, got {given}")


def check_kubectl(cmd: list[str], report: Report) -> None:
    args = cmd[1:]
    if "--" in args:  # kubectl exec POD -- CMD...: check the command run in the pod too
        inner = args[args.index("--") + 1:]
        args = args[: args.index("--")]
        check(inner, report)
    for i, tok in enumerate(args):
        target = None
        if tok in ("-k", "--kustomize") and i + 1 < len(args):
            target = args[i + 1]
        elif tok.startswith("--kustomize="):
            target = tok.split("=", 1)[1]
        elif tok == "kustomize" and i + 1 < len(args):
            target = args[i + 1]
        if target is not None:
            report.need((REPO / target / "kustomization.yaml").exists(),
                        f"{' '.join(cmd)}: {target} holds no kustomization.yaml")
            report.seen.append(f"kustomize {target}")


def check_helm(cmd: list[str], report: Report) -> None:
    """A chart is `REPO/CHART` of a `helm repo add` name (not a path here); values files are."""
    for i, tok in enumerate(cmd):
        if tok in ("-f", "--values") and i + 1 < len(cmd) and _repo_path(cmd[i + 1]):
            report.need((REPO / cmd[i + 1]).exists(), f"{' '.join(cmd)}: {cmd[i + 1]} does not exist in the repository")
    report.need(not any(t.startswith("./") for t in cmd[1:]), f"{' '.join(cmd)}: install charts from their repository")


def check(cmd: list[str], report: Report) -> None:
    head = Path(cmd[0]).name
    if head == "helm":
        check_helm(cmd, report)
        report.seen.append(" ".join(cmd[:3]))
        return
    check_repo_paths(cmd, report)
    if head == "make":
        check_make(cmd, report)
    elif head == "genserve":
        check_genserve(cmd, report)
    elif head == "kubectl":
        check_kubectl(cmd, report)
    report.seen.append(" ".join(cmd[:3]))


def check_path(markdown: str = "") -> Report:
    report = Report()
    for block in path_blocks(markdown):
        for cmd in commands(block):
            check(cmd, report)
    return report


# ---- the tests --------------------------------------------------------------------------------

def test_every_command_of_the_path_matches_the_repo() -> None:
    report = check_path()
    assert not report.problems, "\n".join(report.problems)


def test_the_path_has_every_step() -> None:
    """Empty cluster → operators → secrets → render → apply → verify, in that order."""
    cmds = [" ".join(c) for b in path_blocks() for c in commands(b)]
    text = "\n".join(cmds)

    def first(pattern: str) -> int:
        hits = [i for i, c in enumerate(cmds) if re.search(pattern, c)]
        assert hits, f"the path has no step matching {pattern!r}:\n{text}"
        return hits[0]

    order = [first(r"^kubectl create namespace genserve"),
             first(r"^helm install \S+ nvidia/gpu-operator"),
             first(r"^helm install prometheus prometheus-community/kube-prometheus-stack"),
             first(r"^helm install kuberay-operator kuberay/kuberay-operator .*--version"),
             first(r"^kubectl -n genserve apply -f \S*secrets"),
             first(r"^make image"),
             first(r"^genserve kuberay render --image"),
             first(r"^kubectl -n genserve apply -k kuberay/"),
             first(r"rollout status statefulset/genserve-gcs-redis"),
             first(r"wait rayservice/genserve"),
             first(r"curl -sf http://127.0.0.1:8000/health")]
    assert order == sorted(order), f"steps out of order: {order}"
    # DCGM: the GPU Operator's exporter is off because the kustomization runs ours.
    assert "dcgmExporter.enabled=false" in text
    import yaml

    kust = yaml.safe_load((REPO / "kuberay" / "kustomization.yaml").read_text())
    assert "dcgm-exporter.yaml" in kust["resources"] and "prometheusrule.yaml" in kust["resources"]


def test_commands_parser() -> None:
    block = ("# a comment\nFOO=1 make image IMAGE=x:1 && genserve kuberay render \\\n  --image x:1 # trailing\n"
             "kubectl -n ns exec svc/h -c c -- genserve status | head; echo 'a && b'\n")
    assert commands(block) == [["make", "image", "IMAGE=x:1"], ["genserve", "kuberay", "render", "--image", "x:1"],
                               ["kubectl", "-n", "ns", "exec", "svc/h", "-c", "c", "--", "genserve", "status"],
                               ["head"], ["echo", "a && b"]]


@pytest.mark.parametrize(("line", "why"), [
    ("make imagez", "no make target 'imagez'"),
    ("genserve kuberay rendr", "has no subcommand 'rendr'"),
    ("genserve kuberay render --imag x:1", "has no option '--imag'"),
    ("genserve kuberay", "is a group, not a command"),
    ("genserve config check", "missing argument"),
    ("genserve config check configs/serve.yaml configs/local.yaml", "takes ['path']"),
    ("kubectl -n genserve apply -k kuberay/nope/", "holds no kustomization.yaml"),
    ("kubectl -n genserve apply -k configs/", "holds no kustomization.yaml"),
    ("kubectl -n genserve apply -f kuberay/missing.yaml", "kuberay/missing.yaml does not exist"),
    ("kubectl create configmap x --from-file=configs/grafana/nope.json", "configs/grafana/nope.json does not exist"),
    ("kubectl exec svc/genserve-head-svc -- genserve tenants create acme --conifg x", "has no option '--conifg'"),
    ("helm install p prometheus-community/kube-prometheus-stack -f configs/prometheus/nope.yaml", "nope.yaml does not"),
])
def test_checker_catches_drift(line: str, why: str) -> None:
    """The check is not vacuous: a misspelt target, subcommand, flag or path fails."""
    doc = f"{SECTION}\n\n```bash\n{line}\n```\n"
    report = check_path(doc)
    assert any(why in p for p in report.problems), report.problems


def test_checker_accepts_the_real_cli() -> None:
    doc = (f"{SECTION}\n\n```bash\ngenserve kuberay render --image r.example.com/g:1 --check\n"
           "genserve keys create --tenant acme --label first --config configs/serve.yaml\n"
           "genserve config check configs/serve.yaml\nmake image IMAGE=r.example.com/g:1\n```\n")
    report = check_path(doc)
    assert not report.problems, report.problems
    assert {"genserve kuberay render", "genserve keys create", "genserve config check"} <= set(report.seen)
