"""The Tools tab without a browser: command lines from the form's values,
refusals before anything runs, and a fake tool (written here, printing the
real tools' progress/error/wrote lines) followed while it runs."""

from __future__ import annotations

import os
import sys
import textwrap
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from core.errors import UserError
from gui import exports, tool_runs, tools
from gui.cli_runs import CANCELLED, CliResult
from gui.datadir import DataDirs
from gui.handlers import Cancels, Context
from gui.jobs import JobRunner
from gui.tools_tab import progress_html, run_updates
from tests.gui_fake_trainer import write_adapter

FAKE_TOOL = textwrap.dedent('''
    import os, sys, time
    from pathlib import Path
    sys.path.insert(0, os.environ["REPO_ROOT"])
    from tests.gui_fake_trainer import write_adapter
    mode = os.environ.get("FAKE_TOOL_MODE", "ok")
    args = sys.argv[1:]
    out = Path(args[args.index("--out") + 1])
    go = os.environ.get("FAKE_TOOL_GO")
    for done in range(1, 4):
        print(f"progress: {done}/3 layer_{done}", file=sys.stderr, flush=True)
        if mode == "hang":  # until killed (or, if never, exits 3 within a minute)
            time.sleep(60)
            sys.exit(3)
        if go and done == 1:
            # Waits for the test, which answers only once it has seen this line.
            deadline = time.monotonic() + 30
            while not Path(go).exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            if not Path(go).exists():
                sys.exit(3)
    if mode == "error":
        print(f"error: {args[1]} holds no LoRA modules; pick an adapter file.", file=sys.stderr)
        sys.exit(2)
    if mode == "crash":
        raise ValueError("shapes (4, 2) and (8, 2) do not fit")
    if mode == "silent":
        sys.exit(0)
    if out.suffix == ".toml":  # import-kohya: a preset
        out.write_text("[network]\\nrank = 12\\n")
    else:
        write_adapter(out, "tool")
    print("resized 1 module: rank 4 -> 2")
    print(f"wrote: {out}")
''')


@pytest.fixture
def dirs(tmp_path) -> DataDirs:
    return DataDirs(tmp_path / "data").create()


@pytest.fixture
def adapter(dirs) -> Path:
    path = dirs.outputs / "run" / "run.safetensors"
    path.parent.mkdir(parents=True)
    write_adapter(path, "run")
    return path


@pytest.fixture
def fake(tmp_path, monkeypatch) -> Path:
    """The tools' command lines point at FAKE_TOOL instead of the real CLIs."""
    script = tmp_path / "fake_tool.py"
    script.write_text(FAKE_TOOL)
    monkeypatch.setenv("REPO_ROOT", str(Path(__file__).resolve().parents[1]))
    monkeypatch.setattr(tools, "cli", lambda module, *args: [sys.executable, str(script),
                                                             module, *args])
    return script


def argv(planned: tools.Planned) -> list[str]:
    assert planned.command[:2] == [sys.executable, "-m"]
    return planned.command[2:]


# --- command lines ---------------------------------------------------------------------
def test_resize_command_lines(dirs, adapter):
    out = dirs.outputs / "tools"
    fixed = tools.plan("resize", {"file": str(adapter), "method": "rank", "rank": 4.0,
                                  "precision": "fp16", "name": ""}, dirs)
    assert argv(fixed) == ["networks", "resize", str(adapter), "--rank", "4", "--out",
                           str(out / "run-r4.safetensors"), "--precision", "fp16"]
    assert fixed.out == out / "run-r4.safetensors" and fixed.kind == "adapter"
    dynamic = tools.plan("resize", {"file": str(adapter), "method": "sv_fro", "rank": 16,
                                    "value": " 0.9 ", "conv_rank": "2", "precision": "",
                                    "name": "small.safetensors"}, dirs)
    assert argv(dynamic) == ["networks", "resize", str(adapter), "--dynamic", "sv_fro", "--value",
                             "0.9", "--rank", "16", "--conv-rank", "2", "--out",
                             str(out / "small.safetensors")]
    unbounded = tools.plan("resize", {"file": str(adapter), "method": "sv_ratio", "rank": None,
                                      "value": "4", "name": "my lora/../x"}, dirs)
    assert argv(unbounded)[3:7] == ["--dynamic", "sv_ratio", "--value", "4"]
    assert "--rank" not in argv(unbounded)
    assert unbounded.out.parent == out and "/" not in unbounded.out.name


def test_merge_convert_merge_into_extract_import_command_lines(dirs, adapter, tmp_path):
    other = tmp_path / "other.safetensors"
    write_adapter(other, "other")
    merge = tools.plan("merge", {"files": f"{adapter}:0.7\n\n  {other}  \n", "rank": "8",
                                 "conv_rank": "4", "precision": "bf16", "name": "both"}, dirs)
    assert argv(merge) == ["networks", "merge", f"{adapter}:0.7", str(other), "--out",
                           str(dirs.outputs / "tools" / "both.safetensors"), "--rank", "8",
                           "--conv-rank", "4", "--precision", "bf16"]
    exact = tools.plan("merge", {"files": f"{adapter}\n{other}:-1", "rank": ""}, dirs)
    assert argv(exact) == ["networks", "merge", str(adapter), f"{other}:-1", "--out",
                           str(dirs.outputs / "tools" / "run-merged.safetensors")]
    convert = tools.plan("convert", {"file": str(tmp_path), "name": "", "drop_unknown": True},
                         dirs)
    assert argv(convert) == ["networks", "convert", str(tmp_path.resolve()), "--out",
                             str(dirs.outputs / "tools" / f"{tmp_path.name}-kohya.safetensors"),
                             "--drop-unknown"]
    base, tuned = tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"
    base.write_bytes(b"x")
    tuned.write_bytes(b"y")
    into = tools.plan("merge-into", {"model": str(base), "files": f"{adapter}:-0.5",
                                     "precision": "fp16", "diffusers": True, "name": ""}, dirs)
    assert argv(into) == ["trainer", "merge-into", "--model", str(base), "--lora",
                          f"{adapter}:-0.5", "--out", str(dirs.root / "models" / "base-run"),
                          "--precision", "fp16", "--diffusers"]
    assert into.kind == "model"
    single = tools.plan("merge-into", {"model": str(base), "files": str(adapter), "name": "m"},
                        dirs)
    assert argv(single)[-2:] == ["--out", str(dirs.root / "models" / "m.safetensors")]
    extract = tools.plan("extract", {"base": str(base), "tuned": str(tuned), "rank": 16,
                                     "conv_rank": "4", "precision": "fp32", "name": ""}, dirs)
    assert argv(extract) == ["trainer", "extract", "--base", str(base), "--tuned", str(tuned),
                             "--rank", "16", "--conv-rank", "4", "--out",
                             str(dirs.outputs / "tools" / "tuned-extracted-r16.safetensors"),
                             "--precision", "fp32"]
    kohya, datasets = tmp_path / "kohya.json", tmp_path / "datasets.toml"
    kohya.write_text("{}")
    datasets.write_text("")
    imported = tools.plan("import-kohya", {"file": str(kohya), "name": ""}, dirs)
    assert argv(imported) == ["trainer", "import-kohya", str(kohya), "--out",
                              str(dirs.presets / "kohya.toml")]
    assert imported.kind == "preset"
    (dirs.presets / "mine.toml").write_text("")
    again = tools.plan("import-kohya", {"file": str(kohya), "dataset_config": str(datasets),
                                        "name": "mine", "overwrite": True}, dirs)
    assert argv(again) == ["trainer", "import-kohya", str(kohya), "--out",
                           str(dirs.presets / "mine.toml"), "--dataset-config", str(datasets),
                           "--force"]


@pytest.mark.parametrize(("tool", "values", "message"), [
    ("resize", {"file": "", "method": "rank", "rank": 4}, "Resize: pick an adapter from the list"),
    ("resize", {"method": "rank", "rank": 2.5}, "Rank '2.5' is not a whole number"),
    ("resize", {"method": "rank", "rank": 0}, "Rank 0 must be above 0"),
    ("resize", {"method": "rank", "rank": None}, "Rank is empty"),
    ("resize", {"method": "sv_fro", "value": "1.5"}, "The sv_fro value 1.5 is above 1"),
    ("resize", {"method": "sv_ratio", "value": "0.5"}, "The sv_ratio value 0.5 is below 1"),
    ("resize", {"method": "sv_cumulative", "value": "lots"}, "'lots' is not a number"),
    ("merge", {"files": "ADAPTER"}, "Merge: enter at least 2 adapter files"),
    ("merge", {"files": "ADAPTER:heavy\nADAPTER"}, "the weight of ADAPTER 'heavy' is not"),
    ("merge", {"files": "ADAPTER\nADAPTER", "conv_rank": "4"}, "a conv rank needs a rank too"),
    ("merge-into", {"model": "/no/model.safetensors", "files": "ADAPTER"},
     "/no/model.safetensors does not exist"),
    ("extract", {"base": "ADAPTER", "tuned": "ADAPTER", "rank": 4}, "the same; the difference"),
    ("merge-into", {"model": "", "files": "ADAPTER"}, "enter an SD 1.x .safetensors file or"),
    ("import-kohya", {"file": "/no/config.json"}, "/no/config.json is not a file"),
    ("nothing", {}, "Choose a tool first"),
])  # fmt: skip
def test_refusals_before_anything_runs(dirs, adapter, tool, values, message):
    values = {"file": "ADAPTER", **values} if tool == "resize" else values
    filled = {key: str(v).replace("ADAPTER", str(adapter)) if isinstance(v, str) else v
              for key, v in values.items()}
    with pytest.raises(UserError) as refused:
        tools.plan(tool, filled, dirs)
    assert message.replace("ADAPTER", str(adapter)) in str(refused.value)


def test_files_that_are_not_adapters_are_refused_by_their_header(dirs, tmp_path):
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(UserError, match="is not a LoRA/LyCORIS adapter file"):
        tools.plan("resize", {"file": str(model), "method": "rank", "rank": 4}, dirs)


def test_output_names_that_would_overwrite_an_input_are_refused(dirs):
    source = dirs.outputs / "tools" / "mine.safetensors"
    source.parent.mkdir(parents=True)
    write_adapter(source, "mine")
    values = {"file": str(source), "method": "rank", "rank": 2}
    for name in ("mine", "mine.safetensors", " mine "):
        for overwrite in (False, True):
            with pytest.raises(UserError, match="would overwrite the input"):
                tools.plan("resize", {**values, "name": name, "overwrite": overwrite}, dirs)
    merge = {"files": f"{source}\n{source}:0.5", "name": "mine", "overwrite": True}
    with pytest.raises(UserError, match="would overwrite the input"):
        tools.plan("merge", merge, dirs)


def test_an_existing_output_needs_overwrite_and_must_be_what_the_tool_writes(dirs, adapter):
    folder = dirs.outputs / "tools"
    folder.mkdir(parents=True)
    write_adapter(folder / "taken.safetensors", "taken")
    (folder / "notes.safetensors").write_text("my notes")
    values = {"file": str(adapter), "method": "rank", "rank": 2}
    with pytest.raises(UserError, match="already exists; enter another output name, or tick"):
        tools.plan("resize", {**values, "name": "taken"}, dirs)
    assert tools.plan("resize", {**values, "name": "taken", "overwrite": True},
                      dirs).out == folder / "taken.safetensors"
    with pytest.raises(UserError, match="is not a file this tool writes; it is never replaced"):
        tools.plan("resize", {**values, "name": "notes", "overwrite": True}, dirs)


def test_a_bundled_preset_name_is_refused_for_an_import(dirs, tmp_path):
    kohya = tmp_path / "cpu-demo.json"
    kohya.write_text("{}")
    with pytest.raises(UserError, match="the name of a bundled preset"):
        tools.plan("import-kohya", {"file": str(kohya), "name": ""}, dirs)


# --- following a tool while it runs -----------------------------------------------------
def resize_plan(dirs: DataDirs, adapter: Path, name: str = "small") -> tools.Planned:
    planned = tools.plan("resize", {"file": str(adapter), "method": "rank", "rank": 2,
                                    "name": name}, dirs)
    tool_runs.prepare(planned)
    return planned


def test_progress_is_read_while_the_tool_runs(dirs, adapter, fake, tmp_path, monkeypatch):
    """The fake stops after its first progress line until the test answers, which it
    does only on seeing that line: a parent that read stderr only at the end would never
    see it, and the fake would exit 3."""
    go = tmp_path / "go"
    monkeypatch.setenv("FAKE_TOOL_GO", str(go))
    planned = resize_plan(dirs, adapter)
    seen = []
    for event in tool_runs.follow(planned.command, planned.what, poll=0.05):
        seen.append(event)
        if event == (1, 3, "layer_1"):
            go.touch()
    *progress, result = seen
    assert progress == [(1, 3, "layer_1"), *progress[1:]] and progress[-1] == (3, 3, "layer_3")
    assert result.returncode == 0, result.stderr
    done = tool_runs.outcome(planned, result)
    assert done.path == planned.out and done.report == "resized 1 module: rank 4 -> 2"
    assert progress_html(progress[-1]).count('value="3" max="3"') == 1
    assert "3/3 layer_3" in progress_html(progress[-1])


def test_cancel_kills_the_tool_and_writes_nothing(dirs, adapter, fake, monkeypatch):
    monkeypatch.setenv("FAKE_TOOL_MODE", "hang")
    planned = resize_plan(dirs, adapter)
    cancel = threading.Event()
    events = []
    for event in tool_runs.follow(planned.command, planned.what, cancel, poll=0.05):
        events.append(event)
        cancel.set()  # after the first progress line
    assert events[0] == (1, 3, "layer_1")
    assert events[-1].returncode == CANCELLED
    with pytest.raises(UserError, match="^Resizing was cancelled; nothing was written.$"):
        tool_runs.outcome(planned, events[-1])
    assert not planned.out.exists()


def test_closing_the_generator_ends_the_child(dirs, adapter, fake, monkeypatch, tmp_path):
    """The page went away mid-run: Gradio closes the handler's generator."""
    monkeypatch.setenv("FAKE_TOOL_MODE", "hang")
    planned = resize_plan(dirs, adapter)
    pids = []
    real_popen = tool_runs.subprocess.Popen

    def recording(*args, **kwargs):
        process = real_popen(*args, **kwargs)
        pids.append(process)
        return process

    monkeypatch.setattr(tool_runs.subprocess, "Popen", recording)
    running = tool_runs.follow(planned.command, planned.what, poll=0.05)
    assert next(running) == (1, 3, "layer_1")
    running.close()
    assert pids[0].poll() is not None  # killed and reaped, not left running


@pytest.mark.parametrize(("mode", "message"), [
    ("error", "holds no LoRA modules; pick an adapter file."),
    ("crash", "Resizing crashed with ValueError: shapes (4, 2) and (8, 2) do not fit. This is "
              "a bug in the trainer, not in your settings; the console where the app runs has "
              "the details."),
    ("silent", "Resizing ended without saying which file it wrote"),
])  # fmt: skip
def test_a_failed_tool_is_one_paragraph_without_traceback(dirs, adapter, fake, monkeypatch,
                                                          mode, message):
    monkeypatch.setenv("FAKE_TOOL_MODE", mode)
    ctx = Context(dirs=dirs, runner=JobRunner(dirs.jobs), form={})
    shown = list(run_updates(ctx, Cancels(), "resize", {"file": str(adapter), "method": "rank",
                                                        "rank": 2, "name": "x"}))
    status = [s.status for s in shown if s.status is not None]
    assert status[0].startswith("**Resizing:** `python ") and " networks resize " in status[0]
    assert status[-1].startswith("**Problem:** ") and message in status[-1]
    assert "\n" not in status[-1] and "Traceback" not in status[-1]
    assert shown[-1].wrote is None and not (dirs.outputs / "tools" / "x.safetensors").exists()


def test_a_refused_form_never_starts_the_tool(dirs, fake, monkeypatch):
    monkeypatch.setattr(tool_runs.subprocess, "Popen", lambda *a, **k: pytest.fail("started"))
    ctx = Context(dirs=dirs, runner=JobRunner(dirs.jobs), form={})
    shown = list(run_updates(ctx, Cancels(), "resize", {"file": "/no/such.safetensors",
                                                        "method": "rank", "rank": 2}))
    assert [s.status for s in shown] == [
        "**Problem:** /no/such.safetensors is not a file; Resize takes a LoRA/LyCORIS "
        ".safetensors file."]


def test_a_written_adapter_is_listed_by_the_export_tab(dirs, adapter, fake):
    runner = JobRunner(dirs.jobs)
    ctx = Context(dirs=dirs, runner=runner, form={})
    shown = list(run_updates(ctx, Cancels(), "resize", {"file": str(adapter), "method": "rank",
                                                        "rank": 2, "name": "small"}))
    written = dirs.outputs / "tools" / "small.safetensors"
    assert shown[-1].wrote is not None and shown[-1].wrote.path == written
    assert shown[-1].status.startswith(f"**Done:** Resizing wrote {written} in ")
    assert "The Export tab lists it as small.safetensors (tools)." in shown[-1].status
    assert "resized 1 module: rank 4 -> 2" in shown[-1].result
    assert [s.bar for s in shown if s.bar and "layer_3" in s.bar]  # the bar followed the tool
    assert written in exports.adapter_files(dirs, runner)
    assert exports.label(written).startswith("small.safetensors  (tools, ")
    assert sorted(p.name for p in written.parent.iterdir()) == ["small.safetensors"]
    assert os.stat(written).st_size > 0


def test_an_argument_the_tool_does_not_take_is_said_in_words(dirs, adapter):
    planned = resize_plan(dirs, adapter)
    usage = ("usage: python -m networks resize [-h] [--rank RANK] --out OUT\n"
             "                                 file\n"
             "python -m networks resize: error: unrecognized arguments: --conv-rank 2\n")
    with pytest.raises(UserError) as refused:
        tool_runs.outcome(planned, CliResult(2, "", usage))
    assert str(refused.value) == (
        "Resizing: the tool refused the command line the page built (unrecognized arguments: "
        "--conv-rank 2). Is the app older or newer than its tools? Run `python -m networks "
        "resize --help` to see what it takes.")


def test_the_written_path_comes_from_the_last_wrote_line(dirs, adapter):
    planned = resize_plan(dirs, adapter)
    write_adapter(planned.out, "x")
    done = tool_runs.outcome(planned, CliResult(0, f"a table\nwrote: {planned.out}\n", ""))
    assert done.path == planned.out and done.report == "a table"
    with pytest.raises(UserError, match="ended without saying which file it wrote"):
        tool_runs.outcome(planned, CliResult(0, f"a table\nWrote {planned.out}\n", ""))
    with pytest.raises(UserError, match="said it wrote /no/such.safetensors, but there is no"):
        tool_runs.outcome(planned, CliResult(0, "wrote: /no/such.safetensors\n", ""))


def test_a_tool_runs_beside_a_training_job_and_says_so(dirs, adapter, fake, monkeypatch):
    """Tools do not wait in the training queue; they share the machine with it."""
    runner = JobRunner(dirs.jobs)
    monkeypatch.setattr(runner, "current", lambda: SimpleNamespace(id=7))
    shown = list(run_updates(Context(dirs=dirs, runner=runner, form={}), Cancels(), "resize",
                             {"file": str(adapter), "method": "rank", "rank": 2, "name": "x"}))
    assert "Training job 7 is running too: the tool shares the CPU and memory" in shown[0].status
    assert shown[-1].wrote is not None

