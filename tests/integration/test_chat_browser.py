"""The chat example in a real browser: two headless Chromium sessions, one room (#15).

Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them) driven by
selenium. The room is evicted while both members stay connected (hibernation),
and the conversation goes on.
"""

from __future__ import annotations

import asyncio
import os
import shutil

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By

import durable
from tests.integration.daemon import serving
from tests.integration.procs import free_port, wait_for

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and DRIVER) and not os.environ.get("CI"):  # (in CI a missing one fails)
    pytest.skip("chromium and chromium-driver are not installed (apt install chromium "
                "chromium-driver); CI installs them", allow_module_level=True)


def config(port):
    return f"""
slots = 2
idle_timeout = 1
[broker]
heartbeat = 0.2
[http]
listen = "127.0.0.1:{port}"
worker = "durable.examples.worker:fetch"
[namespaces.COUNTER]
class = "durable.examples.counter:Counter"
[namespaces.CHAT]
class = "durable.examples.chat:ChatRoom"
[namespaces.RATELIMIT]
class = "durable.examples.ratelimit:RateLimiter"
[vars]
ratelimit_limit = 100
ratelimit_window = 60
"""


def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1000,800"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(DRIVER))


def join(driver, url, name):
    driver.get(url)
    driver.find_element(By.NAME, "name").send_keys(name)
    driver.find_element(By.CSS_SELECTOR, "#join button").click()
    wait_for(lambda: "connected as" in driver.find_element(By.ID, "status").text, 15,
             f"{name} connected")


def say(driver, text):
    box = driver.find_element(By.NAME, "text")
    box.send_keys(text)
    driver.find_element(By.CSS_SELECTOR, "#say button").click()


def lines(driver):
    return [li.text for li in driver.find_elements(By.CSS_SELECTOR, "#log li.msg")]


def chat_evictions(frontend):
    async def figures():
        async with durable.connect(frontend, timeout=10) as c:
            slots = (await c.statistics())["slots"]
            return (sum(s["reported"].get("evicted", 0) for s in slots),
                    sum(s["reported"].get("active", 0) for s in slots))
    return asyncio.run(figures())


@pytest.mark.slow
def test_two_browsers_chat_across_an_eviction(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}/chat/lobby"
    with serving(tmp_path, config(port)) as d:
        d.wait_ready()
        ann, bob = browser(), browser()
        try:
            join(ann, url, "ann")
            join(bob, url, "bob")
            say(ann, "hello from ann")
            wait_for(lambda: "ann: hello from ann" in lines(bob), 10, "bob saw ann's message")
            # both stay connected while the room is evicted (its only activity: open sockets)
            before = chat_evictions(d.frontend)[0]
            wait_for(lambda: (lambda e, a: e > before and a == 0)(*chat_evictions(d.frontend)),
                     20, "the room was evicted", interval=0.3)
            say(bob, "still here after the eviction")
            wait_for(lambda: "bob: still here after the eviction" in lines(ann), 10,
                     "ann saw bob's message after the room woke up")
            assert "connected as" in ann.find_element(By.ID, "status").text
            # a newcomer gets the history, in order
            carl = browser()
            try:
                join(carl, url, "carl")
                wait_for(lambda: lines(carl) == ["ann: hello from ann",
                                                 "bob: still here after the eviction"],
                         10, "carl saw the history")
            finally:
                carl.quit()
        finally:
            ann.quit()
            bob.quit()
