import pytest

from tests.fakes.storage import BACKENDS


@pytest.fixture(params=sorted(BACKENDS))
async def backend(request, tmp_path):
    b = BACKENDS[request.param](tmp_path)
    await b.open()
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture
async def storage(backend):
    return backend.object()
