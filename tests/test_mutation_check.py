"""The mutation check (scripts/mutation_check.py, not run in CI) stays usable: every
mutant's text occurs in its file exactly as often as the mutant says, and every test file
it runs exists. A refactor that moves the code makes this fail here, not months later."""

from __future__ import annotations

import importlib.util
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "mutation_check", ROOT / "scripts" / "mutation_check.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_every_mutant_targets_code_that_exists():
    script = _load_script()
    assert len(script.MUTANTS) >= 20
    stale = []
    for mutant in script.MUTANTS:
        text = (ROOT / mutant.path).read_text()
        if text.count(mutant.old) != mutant.count or mutant.old == mutant.new:
            stale.append(f"{mutant.name}: {mutant.path} holds {text.count(mutant.old)}")
        for invocation in mutant.tests:
            assert (ROOT / invocation[0]).is_file(), f"{mutant.name}: {shlex.join(invocation)}"
    assert not stale, "stale mutants (the code moved; update them): " + "; ".join(stale)
    names = [mutant.name for mutant in script.MUTANTS]
    assert len(set(names)) == len(names), "two mutants share a name"
