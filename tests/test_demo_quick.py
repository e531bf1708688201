"""`make demo` (issue 2 version): the quick run trains the tiny model and the preference margin grows."""

import re

from srpo_trl.demo import main


def test_quick_demo_improves_margin_and_reference_nll(tmp_path, capsys):
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    nll = re.search(r"Reference NLL ([\d.]+) -> ([\d.]+); mean margin ([-+\d.]+) -> ([-+\d.]+)", out)
    assert nll, out
    nll_before, nll_after, margin_before, margin_after = map(float, nll.groups())
    assert nll_after < nll_before and margin_after > margin_before
