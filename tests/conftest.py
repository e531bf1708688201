import os
import tempfile


# Nothing may be downloaded from a model hub, ever: fail fast instead of hanging on a network call.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TQDM_DISABLE", "1")


# --- OpenAI-compatible test server (tests/openai_server.py) -------------------------------------
import pytest  # noqa: E402


# Precomputed reference log-probs are cached on disk; keep the tests' cache out of ~/.cache.
os.environ.setdefault("SRPO_TRL_CACHE", tempfile.mkdtemp(prefix="srpo-trl-cache-"))


@pytest.fixture
def openai_server():
    """A started :class:`openai_server.OpenAITestServer` (answers "ok" until told otherwise; set
    ``openai_server.handler`` or ``openai_server.enqueue(...)``), stopped after the test."""
    from openai_server import OpenAITestServer

    server = OpenAITestServer().start()
    try:
        yield server
    finally:
        server.stop()
