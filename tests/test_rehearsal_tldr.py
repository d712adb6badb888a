"""The CI subset's first part (tests/test_rehearsal.py: CI_PARTS): SignCert-PO with its baselines on TL;DR, rehearsed
end to end (Pythia's untied head, UWO's three members, AdvPO's sweep, BSPO's ScoreLM, certify, the Skywork gold)."""
import pytest

from tests.test_rehearsal import CI_PARTS, rehearse


@pytest.mark.slow
def test_signcert_tldr_paper_config_with_its_baselines_rehearses_end_to_end(tmp_path):
    signals = rehearse(tmp_path, list(CI_PARTS[0]))
    assert set(signals) == {"signcert-tldr-pythia-1b"}
