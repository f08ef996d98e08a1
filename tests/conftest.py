import os

import pytest
import torch

import fastkd

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_report_header(config):
    return f"fastkd build: {fastkd.build_info()}"


@pytest.fixture(scope="session", autouse=True)
def _require_compiled_kernels():
    # The suite tests the kernels, not the fallback: a missing build must fail loudly, not pass on the
    # reference. FASTKD_ALLOW_REFERENCE=1 runs it against the fallback on purpose.
    if os.environ.get("FASTKD_ALLOW_REFERENCE") != "1":
        info = fastkd.build_info()
        assert info["compiled"], f"fastkd's compiled kernels did not load: {info['load_error']}"


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
