"""The PEFT side of a parity test, built honestly.

A parity test compares our outputs with peft's. When peft cannot build or run its side on the
installed versions (peft 0.21.2 predates transformers 5.24's rename of `past_key_values` to
`cache`), the test must not pass by comparing nothing: it is skipped with the reason, which
pytest prints in its summary (`-rs` in pyproject.toml). And before peft's generations are used
as a reference, they are checked against peft's own forward passes."""
import contextlib
import os

import peft
import pytest
import torch
import transformers

VERSIONS = f"peft {peft.__version__} with transformers {transformers.__version__}"


def unavailable(what: str, err: BaseException | str):
    detail = f"{type(err).__name__}: {err}" if isinstance(err, BaseException) else err
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    pytest.skip(f"{test}: PEFT reference unavailable: {what} on {VERSIONS}: {str(detail)[:300]}")


@contextlib.contextmanager
def peft_side(what: str):
    """Run peft's part of a test; an error inside peft skips the test with the reason."""
    try:
        yield
    except AssertionError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure inside peft means there is no reference
        unavailable(what, err)


def checked_generate(theirs, kwargs, recompute):
    """peft's generate(**kwargs), used as a reference only if it equals `recompute(theirs)`: greedy
    decoding by full forward passes through the same peft model (no cache)."""
    with peft_side("peft generate"), torch.no_grad():
        out = theirs.generate(**kwargs)
        again = recompute(theirs)
    if not torch.equal(out, again):
        unavailable("peft's cached generation", "it disagrees with greedy decoding by peft's own forward "
                    f"passes ({out.tolist()} vs {again.tolist()})")
    return out


def forward(theirs, batch):
    """peft's forward. peft 0.21 runs prefix tuning on a classifier only if the model's forward has a
    `past_key_values` parameter (from transformers 5.24 it is called `cache`) and raises otherwise;
    then the same computation is made from peft's own parts: its `get_prompt()` cache and its
    mask with the virtual positions prepended, through the wrapped model."""
    with peft_side("peft forward"):
        try:
            return theirs(**batch)
        except ValueError as err:
            if "past key values" not in str(err):
                raise
        batch = dict(batch)
        n = theirs.active_peft_config.num_virtual_tokens
        rows = batch["input_ids"].shape[0]
        mask = batch.get("attention_mask")
        if mask is not None:
            batch["attention_mask"] = torch.cat([torch.ones(rows, n, dtype=mask.dtype), mask], dim=1)
        return theirs.base_model(**batch, past_key_values=theirs.get_prompt(rows))
