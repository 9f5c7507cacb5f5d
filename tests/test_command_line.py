"""`evit-hf` as argparse subcommands: `evit-hf --help` lists each command on one line, every option shown is spelled
with dashes, convert's underscore spellings of earlier versions are hidden aliases of the dash ones, and a missing or
unknown command ends in one line with exit status 2. Also: image file extensions are one list."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import evit_hf
from evit_hf.cli import build_parser, main
from evit_hf.images import IMAGE_EXTENSIONS, picture_extensions


COMMAND_SUMMARIES = {
    "visualize": "draw the patches an EViT model keeps",
    "benchmark": "time EViT against the stock model",
    "convert": "turn a timm-layout ViT/DeiT checkpoint into an evit_hf folder",
    "calibrate": "choose reduction layers and keep rates for a MACs budget",
}
# convert's options as earlier versions spelled them, their dash spellings, and a value for each.
CONVERT_ALIASES = {
    "--keep_rate": ("--keep-rate", ["0.5"]),
    "--reduction_layers": ("--reduction-layers", ["3", "1"]),
    "--no_fuse": ("--no-fuse", []),
    "--use_ema": ("--use-ema", []),
    "--num_attention_heads": ("--num-attention-heads", ["3"]),
}
OPTION = re.compile(r"(?<![\w-])--?[A-Za-z0-9][\w-]*")


def help_text(capsys, monkeypatch, argv) -> str:
    monkeypatch.setenv("COLUMNS", "200")  # a wide terminal: no line is wrapped
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_help_lists_every_command_with_its_one_line(capsys, monkeypatch):
    text = help_text(capsys, monkeypatch, [])
    for name, summary in COMMAND_SUMMARIES.items():
        lines = [line for line in text.splitlines() if line.split()[:1] == [name]]
        assert lines == [f"    {name:<9}  {summary}"], text
    # The same one line in a narrow terminal: the name never stands on a line of its own.
    monkeypatch.setenv("COLUMNS", "60")
    with pytest.raises(SystemExit):
        main(["--help"])
    narrow = capsys.readouterr().out.splitlines()
    for name in COMMAND_SUMMARIES:
        assert any(re.fullmatch(rf"    {name}\s+\S.*", line) for line in narrow), narrow


@pytest.mark.parametrize("command", COMMAND_SUMMARIES)
def test_help_shows_options_spelled_with_dashes_only(command, capsys, monkeypatch):
    shown = set(OPTION.findall(help_text(capsys, monkeypatch, [command])))
    assert {"-h", "--help"} < shown
    assert [option for option in shown if "_" in option] == []


def test_convert_help_shows_the_dash_spellings_and_hides_the_underscore_ones(capsys, monkeypatch):
    shown = set(OPTION.findall(help_text(capsys, monkeypatch, ["convert"])))
    for alias, (flag, _) in CONVERT_ALIASES.items():
        assert flag in shown and alias not in shown


@pytest.mark.parametrize("alias", CONVERT_ALIASES)
def test_convert_underscore_spellings_parse_as_the_dash_ones(alias):
    flag, values = CONVERT_ALIASES[alias]
    parser, _ = build_parser()
    given = ["convert", "checkpoint.pth", "out"]
    with_alias = vars(parser.parse_args([*given, alias, *values]))
    with_flag = vars(parser.parse_args([*given, flag, *values]))
    assert with_alias == with_flag
    assert with_flag != vars(parser.parse_args(given))  # the option took effect


def test_convert_underscore_spelling_names_itself_in_its_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "checkpoint.pth", "out", "--keep_rate", "2"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("evit-hf convert: error: argument --keep_rate: ")


@pytest.mark.parametrize(
    "argv, message",
    [([], "evit-hf: error: give a command: visualize, benchmark, convert or calibrate"),
     (["train"], "evit-hf: error: unknown command 'train'; the commands are visualize, benchmark, convert, calibrate"),
     (["--keep-rate", "0.5"], "evit-hf: error: unknown command '--keep-rate'; the commands are visualize,")],
    ids=["none", "unknown", "option-before-any-command"],
)  # fmt: skip
def test_a_missing_or_unknown_command_is_one_line_and_exit_status_2(argv, message):
    script = os.path.join(os.path.dirname(sys.executable), "evit-hf")
    result = subprocess.run([script, *argv], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("usage: evit-hf "), result.stderr
    assert lines[1].startswith(message)


def test_an_unknown_option_is_the_command_s_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "checkpoint.pth", "out", "--bogus"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == "evit-hf convert: error: unrecognized arguments: --bogus"


class SettingsTaken(Exception):
    """Raised in place of the benchmark's run: the settings the command made of its options."""


@pytest.mark.parametrize("memory_flag, measure_memory", [([], True), (["--no-memory"], False)], ids=["memory", "none"])
def test_benchmark_options_become_its_settings(memory_flag, measure_memory, monkeypatch):
    import evit_hf.benchmark

    def take_settings(settings, progress):
        raise SettingsTaken(settings, progress)

    monkeypatch.setattr(evit_hf.benchmark, "run_benchmark", take_settings)
    argv = ["benchmark", "--model", "deit-tiny", "--batch-sizes", "2", "4", "--image-sizes", "32",
            "--keep-rates", "0.5", "0.9/0.7/0.5", "--rounds", "3", "--warmup", "1", "--compile", "no",
            "--no-progress", *memory_flag]  # fmt: skip
    with pytest.raises(SettingsTaken) as taken:
        main(argv)
    settings, progress = taken.value.args
    assert (settings.model, settings.batch_sizes, settings.image_sizes) == ("deit-tiny", [2, 4], [32])
    assert settings.keep_rates == [0.5, [0.9, 0.7, 0.5]] and (settings.rounds, settings.warmup) == (3, 1)
    assert settings.compiled == [False] and settings.measure_memory is measure_memory and progress is False


def test_image_extensions_are_those_datasets_reads():
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    assert IMAGE_EXTENSIONS == frozenset(ImageFolder.EXTENSIONS)


def test_picture_extensions_are_readable_ones_written_whole():
    writable = picture_extensions()
    assert writable[:2] == (".png", ".jpg") and len(set(writable)) == len(writable)
    assert set(writable) <= IMAGE_EXTENSIONS
    assert {".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff"} <= set(writable)
    # 1-bit only (XBM), at most 256 pixels wide (ICO), or not readable back without Ghostscript (EPS).
    assert not {".xbm", ".ico", ".eps"} & set(writable)


def literal_image_extension_lists(path: Path) -> list[int]:
    """Line numbers of the literal collections in `path` that hold two or more image file extensions."""
    looks_like_extension = re.compile(r"\.(png|jpe?g|bmp|gif|tiff?|webp|ppm|tga)", re.IGNORECASE)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            strings = [
                each.value for each in node.elts if isinstance(each, ast.Constant) and isinstance(each.value, str)
            ]
            if sum(bool(looks_like_extension.fullmatch(text)) for text in strings) >= 2:
                found.append(node.lineno)
    return found


def test_image_extensions_are_listed_once():
    package = Path(evit_hf.__file__).parent
    files = [*package.rglob("*.py"), *(package.parent / "examples").glob("*.py")]
    listing = {str(path.relative_to(package.parent)): literal_image_extension_lists(path) for path in files}
    listing = {name: lines for name, lines in listing.items() if lines}
    assert list(listing) == ["evit_hf/images.py"] and len(listing["evit_hf/images.py"]) == 1, listing
