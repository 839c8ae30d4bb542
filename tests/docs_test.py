"""The documentation site: built with warnings as errors, then read in Chromium.

`test_site` runs `mkdocs build --strict` (which executes the four notebooks,
see `docs/_hooks/notebooks.py`, and checks that every public name has an API
entry, see `docs/_hooks/reference.py`), checks that no page loads anything
from the network, then opens the built site in headless Chromium (Debian's
`chromium` and `chromium-driver`, which `.ci/run` installs; selenium drives
the system's chromedriver, nothing is downloaded) with every host but
localhost unresolvable: the home page, an API page with its signature, a
notebook page whose plot loads, and the search box finding `model_rnn`, with
no error on the browser console. Screenshots of each page go to
`build/screenshots/` (CI keeps them).

One test builds and browses: under pytest-xdist a module fixture would build
once per worker.
"""

import contextlib
import functools
import html.parser
import http.server
import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys
import threading
import time

from mkdocs.exceptions import PluginError
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SITE = ROOT / "build" / "site"
SCREENSHOTS = ROOT / "build" / "screenshots"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
TIMEOUT_S = 60


def _hook(name):
  spec = importlib.util.spec_from_file_location(
      f"docs_hook_{name}", ROOT / "docs" / "_hooks" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


class _Fetches(html.parser.HTMLParser):
  """What a page makes the browser load: scripts, styles, fonts, images."""

  def __init__(self):
    super().__init__()
    self.urls = []
    self._inline = False

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if tag in ("script", "img", "iframe") and attrs.get("src"):
      self.urls.append(attrs["src"])
    if tag == "link" and attrs.get("rel") != "canonical" and attrs.get("href"):
      self.urls.append(attrs["href"])
    self._inline = tag in ("script", "style")

  def handle_data(self, data):
    if self._inline:  # import("https://..."), @import / url(https://...)
      self.urls += re.findall(r"""(?:import\(|url\()\s*['"]?(https?://[^'")]+)""",
                              data)

  def handle_endtag(self, tag):
    self._inline = False


def _external_fetches(site):
  """{file: [URL]} for each page or stylesheet that loads from another host."""
  found = {}
  for path in sorted(site.rglob("*.html")) + sorted(site.rglob("*.css")):
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".css":
      urls = re.findall(r"""(?:@import\s*|url\()\s*['"]?((?:https?:)?//[^'")\s]+)""",
                        text)
    else:
      parser = _Fetches()
      parser.feed(text)
      urls = [u for u in parser.urls if re.match(r"(https?:)?//", u)]
    if urls:
      found[str(path.relative_to(site))] = urls
  return found


class _QuietHandler(http.server.SimpleHTTPRequestHandler):

  def log_message(self, *args):
    pass


@contextlib.contextmanager
def _served(directory):
  handler = functools.partial(_QuietHandler, directory=str(directory))
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}"
  finally:
    server.shutdown()
    server.server_close()


@contextlib.contextmanager
def _chromium():
  from selenium import webdriver  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.chrome.service import Service  # pylint: disable=g-import-not-at-top
  if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.fail("The docs test needs Debian's Chromium: apt-get install -y "
                "chromium chromium-driver (.ci/run does).")
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                   "--disable-dev-shm-usage", "--window-size=1280,1000",
                   # Offline: any request off this machine fails loudly.
                   "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
    options.add_argument(argument)
  options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
  driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
  driver.set_page_load_timeout(TIMEOUT_S)
  try:
    yield driver
  finally:
    driver.quit()


def _console_errors(driver):
  return [entry for entry in driver.get_log("browser")
          if entry["level"] == "SEVERE"]


def _open(driver, url, name):
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=g-import-not-at-top
  driver.get(url)
  WebDriverWait(driver, TIMEOUT_S).until(
      lambda d: d.execute_script("return document.readyState") == "complete")
  assert "404" not in driver.title, f"{url}: {driver.title}"
  errors = _console_errors(driver)
  assert not errors, f"{name} ({url}): console errors {errors}"


def _shoot(driver, name):
  SCREENSHOTS.mkdir(parents=True, exist_ok=True)
  time.sleep(0.5)  # Let the header's title transition settle.
  assert driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


def _check_home(driver, base):
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  _open(driver, base + "/", "home")
  article = driver.find_element(By.CSS_SELECTOR, "article.md-content__inner")
  assert "Step any single-step Keras model" in article.text
  nav = driver.find_element(By.CSS_SELECTOR, "nav.md-nav--primary").text
  for title in ("Getting started", "Guides", "API reference", "Notebooks"):
    assert title in nav, (title, nav)
  _shoot(driver, "home")


def _check_api_page(driver, base):
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  _open(driver, base + "/reference/stepper.model_rnn/", "API page")
  signature = driver.find_element(By.CSS_SELECTOR, ".doc-signature")
  assert signature.is_displayed()
  assert re.search(r"model_rnn\(\s*step.*inputs", signature.text, re.DOTALL), (
      signature.text)
  text = driver.find_element(By.CSS_SELECTOR, "article").text
  for section in ("Parameters:", "Returns:", "Raises:"):
    assert section in text, section
  # The doctest renders as a Python session: prompts highlighted as such.
  examples = [block for block in driver.find_elements(By.CSS_SELECTOR,
                                                      ".highlight")
              if ">>> outputs, final_states" in block.text]
  assert examples and examples[0].find_elements(By.CSS_SELECTOR, ".gp")
  _shoot(driver, "api_model_rnn")


def _check_notebook_page(driver, base):
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  _open(driver, base + "/notebooks/01_from_dynamic_rnn/", "notebook page")
  plots = driver.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output img")
  assert plots, "the notebook page shows no plot"
  driver.execute_script(
      "arguments[0].scrollIntoView({block: 'center'});", plots[0])
  loaded = driver.execute_script(
      "return arguments[0].complete && arguments[0].naturalWidth > 0;",
      plots[0])
  assert loaded, "the notebook's plot did not load"
  _shoot(driver, "notebook_01")


def _check_search(driver, base):
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=g-import-not-at-top
  _open(driver, base + "/", "search")
  box = driver.find_element(By.CSS_SELECTOR, "input.md-search__input")
  box.click()  # In the header at this window width.
  box.send_keys("model_rnn")
  WebDriverWait(driver, TIMEOUT_S).until(
      lambda d: d.find_elements(By.CSS_SELECTOR, ".md-search-result__item"))
  links = [link.get_attribute("href") for link in driver.find_elements(
      By.CSS_SELECTOR, ".md-search-result__item a")]
  assert any("/reference/stepper.model_rnn/" in link for link in links), links
  errors = _console_errors(driver)
  assert not errors, f"search: console errors {errors}"
  _shoot(driver, "search_model_rnn")


@pytest.mark.slow
def test_site():
  build = subprocess.run(
      [sys.executable, "-m", "mkdocs", "build", "--strict",
       "--site-dir", str(SITE)],
      cwd=ROOT, capture_output=True, text=True, check=False,
      env={**os.environ, "NO_MKDOCS_2_WARNING": "1",
           "TF_CPP_MIN_LOG_LEVEL": "2"})
  assert build.returncode == 0, build.stdout + build.stderr
  assert not _external_fetches(SITE), _external_fetches(SITE)
  with _served(SITE) as base, _chromium() as driver:
    _check_home(driver, base)
    _check_api_page(driver, base)
    _check_notebook_page(driver, base)
    _check_search(driver, base)


def test_offline_scan_finds_external_fetches(tmp_path):
  (tmp_path / "a.html").write_text(
      '<link rel="stylesheet" href="https://fonts.googleapis.com/css">'
      '<script src="assets/local.js"></script>'
      '<script>import("https://cdn.example/m.mjs")</script>'
      '<a href="https://example.com/">a link is not a fetch</a>')
  (tmp_path / "b.css").write_text(
      '@import "https://fonts.example/f.css"; a { background: url(x.png) }'
      ' b { src: url(//fonts.example/f.woff2) }')
  assert _external_fetches(tmp_path) == {
      "a.html": ["https://fonts.googleapis.com/css", "https://cdn.example/m.mjs"],
      "b.css": ["https://fonts.example/f.css", "//fonts.example/f.woff2"]}


def test_reference_check_names_a_public_name_without_entry(tmp_path):
  reference = _hook("reference")
  expected = reference.expected_anchors()
  for path in ("stepper.model_rnn", "stepper.Trainer.fit", "stepper.verify",
               "stepper.verify.compare", "stepper.steps.split"):
    assert path in expected, path
  site = tmp_path / "reference"
  site.mkdir()
  ids = "".join(f'<h2 id="{path}"></h2>' for path in expected
                if path != "stepper.verify.compare")
  (site / "index.html").write_text(ids)

  class Config:
    site_dir = str(tmp_path)

  with pytest.raises(PluginError, match=r"without a rendered entry: "
                     r"stepper\.verify\.compare\."):
    reference.on_post_build(Config())
  (site / "compare.html").write_text('<h2 id="stepper.verify.compare"></h2>')
  reference.on_post_build(Config())


def test_code_blocks_fences_doctests_and_literal_blocks():
  import markdown  # pylint: disable=g-import-not-at-top
  extension = _hook("code_blocks").CodeBlocksExtension()
  text = ("Runs it.\n\n>>> x = 1\n>>> x + 1\n2\n\nA picture::\n\n"
          "  [0 1] [2 3]\n\nAfter.\n")
  rendered = markdown.markdown(text, extensions=["fenced_code", extension])
  assert "<blockquote>" not in rendered
  assert '<code class="language-pycon">&gt;&gt;&gt; x = 1\n' in rendered
  assert '<code class="language-text">[0 1] [2 3]\n</code>' in rendered
  assert "A picture:</p>" in rendered


def test_private_parameters_leave_the_docstring():
  drop = _hook("griffe_private").without_private_args
  doc = ("Runs.\n\nArgs:\n  x: The input.\n  _reset_to: Private: the\n"
         "    states.\n  y: Kept.\n\nReturns:\n  Outputs.")
  assert drop(doc) == ("Runs.\n\nArgs:\n  x: The input.\n  y: Kept.\n\n"
                       "Returns:\n  Outputs.")


def test_every_result_file_is_on_the_benchmarks_page(caplog):
  benchmarks = _hook("benchmarks")

  class Config:
    config_file_path = str(ROOT / "mkdocs.yml")

  class Page:
    class file:  # pylint: disable=invalid-name
      src_uri = benchmarks.PAGE

  page = (ROOT / "docs" / benchmarks.PAGE).read_text(encoding="utf-8")
  benchmarks.on_page_markdown(page, Page, Config, None)
  assert not caplog.records, [r.getMessage() for r in caplog.records]
  benchmarks.on_page_markdown(page.replace("remat_xla.json", "?"), Page,
                              Config, None)
  assert "remat_xla.json is not on benchmarks.md" in caplog.text
