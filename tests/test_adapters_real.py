"""Real-data check: adapters and MAM on all-MiniLM-L6-v2 + SMS spam (slow; each well under 2 minutes).

Run the figures quoted in docs/adapters.md with:
    .venv/bin/python tests/test_adapters_real.py
"""
import pytest

import deltatune as dt
from real_runs import sms_main, sms_run

# The task head is the pooler + classifier (AdapterHub's two-layer classification head): the
# adapters' signal reaches the classifier through BERT's pooler, which LoRA and BitFit adapt but
# adapters do not; with the pooler frozen, adapters learn far slower on this data.
HEAD = ["classifier", "pooler"]
SETUPS = {
    "houlsby": (lambda: dt.AdapterConfig(kind="houlsby", reduction_factor=16, modules_to_save=HEAD), 1e-3, HEAD),
    "pfeiffer": (lambda: dt.AdapterConfig(kind="pfeiffer", reduction_factor=16, modules_to_save=HEAD), 1e-3, HEAD),
    "parallel": (lambda: dt.AdapterConfig(kind="parallel", reduction_factor=16, scaling=4.0, modules_to_save=HEAD),
                 1e-3, HEAD),
    "mam": (lambda: dt.MAMConfig(modules_to_save=HEAD), 3e-4, HEAD),  # bottleneck 512, s=4: 1e-3 collapses to the majority class
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(SETUPS))
def test_adapters_learn_sms_spam(method):
    r = sms_run(*SETUPS[method])
    assert r["accuracy"] >= 0.95 and r["accuracy"] > r["majority"] + 0.05, r


if __name__ == "__main__":
    import sys
    sms_main(SETUPS, sys.argv[1:])
