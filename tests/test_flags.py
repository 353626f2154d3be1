"""The flags beyond each stage's lesson live in extras/flags.py and are read only when a
command line holds one (nanosft.ArgumentParser). What must hold: --help lists them all, a
default parse never reads extras/, and reading them changes no default."""
import subprocess
import sys

import pytest

import dpo
import finetune
import nanosft
import pretrain
from conftest import ROOT

STAGES = {"pretrain": (pretrain, ["--resume", "--world", "--vocab-size", "--warmup", "--grad-accum"]),
          "finetune": (finetune, ["--lora-rank", "--rewind", "--sft-attributes", "--replay", "--plot"]),
          "dpo": (dpo, ["--pack", "--rewind", "--min-margin", "--label-smoothing", "--time-budget"])}


@pytest.mark.parametrize("stage", list(STAGES))
def test_help_lists_the_flags_beyond_the_lesson(stage, capsys):
    module, extra = STAGES[stage]
    with pytest.raises(SystemExit) as e:
        module.parse_args(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and all(flag in out for flag in extra), out


@pytest.mark.parametrize("stage", list(STAGES))
def test_reading_the_extra_flags_changes_no_default(stage):
    """A command line that names one extra flag at its default value parses to the very values
    of a default run: a default declared in extras/flags.py that disagreed with the stage's
    DEFAULTS would show here."""
    module, _ = STAGES[stage]
    plain = vars(module.parse_args([]))
    for flag, key in (("--warmup", "warmup"), ("--grad-accum", "grad_accum")):  # each also checks the other
        assert vars(module.parse_args([flag, str(plain[key])])) == plain, flag


def test_a_default_parse_reads_nothing_of_extras():
    """Each stage's default parse imports no module of extras/; one extra flag brings
    extras/flags.py in (a fresh process, so nothing is imported already)."""
    code = ("import sys, pretrain, finetune, dpo\n"
            "for stage in (pretrain, finetune, dpo):\n"
            "    stage.parse_args([])\n"
            "print(sorted(m for m in sys.modules if m.startswith('extras')))\n"
            "finetune.parse_args(['--grad-accum', '1'])\n"
            "print('extras.flags' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "True"], out


@pytest.mark.parametrize("argv, needle", [(["--max-iter", "3"], "unrecognized arguments: --max-iter 3"),
                                          (["--lora", "4"], "unrecognized arguments: --lora 4"),
                                          (["--lora-rank", "2", "--oft-block", "4"], "alternatives")])
def test_an_unknown_or_abbreviated_flag_is_one_clear_error(argv, needle):
    with pytest.raises(nanosft.UserError, match=needle):
        finetune.parse_args(argv)
