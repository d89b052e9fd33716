"""The Gradio chat page in headless Chromium (Debian's chromium + chromium-driver): type a
question, read back the answer the default model streams through the API server."""
import shutil
import socket
import time

import pytest

from minideploy.config import EngineConfig
from minideploy.engine.pipeline import Pipeline
from minideploy.serve.api_server import create_app
from minideploy.serve.background import BackgroundServer

webdriver = pytest.importorskip("selenium.webdriver")
pytest.importorskip("gradio")
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="needs Debian's chromium and chromium-driver (apt-get install -y "
                                       "chromium chromium-driver; .ci/run installs them)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(DRIVER), options=options)
    yield driver
    driver.quit()


def test_gradio_chat_streams_an_answer(browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from minideploy.serve.gradio_app import build_demo

    pipe = Pipeline("default", EngineConfig(device="cpu", dtype="float32", session_len=160, max_batch_size=4,
                                            cache_max_entry_count=32, cache_block_seq_len=16))
    with BackgroundServer(create_app(pipe, "default")) as api:
        demo, port = build_demo(api.url), free_port()
        demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        try:
            browser.get(f"http://127.0.0.1:{port}/")
            deadline = time.monotonic() + 60
            while not browser.find_elements(By.CSS_SELECTOR, "textarea"):
                assert time.monotonic() < deadline, "the chat page did not load"
                time.sleep(0.2)
            box = browser.find_element(By.CSS_SELECTOR, "textarea")
            box.send_keys("What is the capital of France?")
            box.send_keys(Keys.ENTER)
            answer, seen = "", set()
            while time.monotonic() < deadline:  # read until the answer stops growing
                bots = browser.find_elements(By.CSS_SELECTOR, '[data-testid="bot"]')
                answer = bots[-1].text if bots else ""
                seen.add(answer)
                if answer and api.app.state.engine.stats.running == 0:
                    break
                time.sleep(0.2)
        finally:
            demo.close()
    assert browser.find_element(By.CSS_SELECTOR, '[data-testid="user"]').text == "What is the capital of France?"
    assert answer.strip(), f"no answer appeared; saw {seen}"
