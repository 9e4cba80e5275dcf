"""The rendered book works offline: the scripts it would load from CDNs are served from the build.

Two roles in one module:

- a command, run by ``make setup``'s book step, that fetches the pinned npm packages (MathJax 3,
  RequireJS, the Jupyter widgets' HTML manager) with ``npm pack``, checks each tarball against its
  registry integrity hash and unpacks the files the book needs into ``.book-assets/``::

      python scripts/book_assets.py            # idempotent: does nothing when they are there

- a Sphinx extension (``_config.yml``: ``local_extensions``) that copies those files into the
  build's ``_static/offline/`` and points MathJax and the widget scripts at them, so that a page
  requests nothing outside the book. It also removes a duplicated inline script: Sphinx 7.4 adds
  scripts registered after the builder starts a second time, once with ``None`` and once with
  ``''`` as their file name, which do not compare equal; sphinx-thebe's ``const THEBE_JS_URL``
  then raises "Identifier 'THEBE_JS_URL' has already been declared" on every page. And it gives
  the theme a valid default colour mode (an empty one logs an error in the console), and
  tells RequireJS where the widget manager's icon fonts are, and lets the widget manager's
  MathJax 2 calls reach MathJax 3.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / ".book-assets"

# package spec -> (registry integrity, files or folders to keep, relative to the package root)
PACKAGES = {
    "mathjax@3.2.2": (
        "sha512-Bt+SSVU8eBG27zChVewOicYs7Xsdt40qm4+UpHyX7k0/O9NliPc+x77k1/FEsPsjKPZGJvtRZM1vO+geW0OhGw==",
        ["es5/tex-mml-chtml.js", "es5/output/chtml", "es5/input/tex/extensions", "es5/ui",
         "es5/a11y"]),
    "requirejs@2.3.7": (
        "sha512-DouTG8T1WanGok6Qjg2SXuCMzszOo0eHeH9hDZ5Y4x8Je+9JB38HdTLT4/VA8OaUhBa0JPVHJ0pyBkM1z+pDsw==",
        ["require.js"]),
    "@jupyter-widgets/html-manager@1.0.6": (
        "sha512-+Mn+Ra8wyIHrYaUpfmf9A3dsLkt/NuwzPQN8sthdxBD35VV5cOJbpmgMhNR27n/rmP3mKyEe0PWCJrtZrXTXDQ==",
        ["dist/embed-amd.js", "dist/*.woff2", "dist/*.woff", "dist/*.ttf", "dist/*.eot",
         "dist/*.svg"]),
}
# Where each script lands in the build, under _static/.
MATHJAX = "offline/mathjax/es5/tex-mml-chtml.js"
REQUIRE = "offline/requirejs/require.js"
EMBED = "offline/html-manager/dist/embed-amd.js"
EMBED_ID = "@jupyter-widgets/html-manager/dist"  # its modules' names, as RequireJS sees them
STAMP = ASSETS / ".complete"
# The widget manager typesets widget labels through MathJax 2's MathJax.Hub.Queue; the book
# loads MathJax 3, which has no Hub ("Cannot read properties of undefined (reading 'Queue')").
# This hands those requests to MathJax 3, once it has started.
MATHJAX2_SHIM = """
(function () {
  var hub = {Queue: function () {
    Array.prototype.forEach.call(arguments, function (job) {
      var mj = window.MathJax;
      if (!Array.isArray(job) || job[0] !== "Typeset" || !mj || !mj.startup) return;
      mj.startup.promise.then(function () { return mj.typesetPromise([job[2]]); });
    });
  }};
  function patch() { if (window.MathJax && !window.MathJax.Hub) window.MathJax.Hub = hub; }
  document.addEventListener("DOMContentLoaded", patch);
  window.addEventListener("load", patch);
})();"""


def _folder(spec: str) -> str:
    return spec.rsplit("@", 1)[0].split("/")[-1]


def integrity(path: Path) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def _extract(tar: tarfile.TarFile, dest: Path) -> None:
    """Extract a tarball's regular files and folders below ``dest`` only. (Python 3.11.4 and
    later have ``filter="data"`` for this; older 3.11 releases do not.)"""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, filter="data")
        return
    root = dest.resolve()
    for member in tar.getmembers():
        target = (dest / member.name).resolve()
        if not (member.isfile() or member.isdir()) or root not in (target, *target.parents):
            raise SystemExit(f"refusing the tarball member {member.name!r}")
    tar.extractall(dest)


def fetch() -> None:
    """Fetch and unpack the packages into .book-assets/ (nothing to do when complete)."""
    if STAMP.is_file() and STAMP.read_text() == repr(sorted(PACKAGES)):
        return
    if shutil.which("npm") is None:
        raise SystemExit("the offline book assets need npm (Debian: apt-get install npm)")
    shutil.rmtree(ASSETS, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        for spec, (expected, keep) in PACKAGES.items():
            out = subprocess.run(["npm", "pack", spec, "--silent"], cwd=tmp, check=True,
                                 capture_output=True, text=True).stdout.split()[-1]
            tarball = Path(tmp) / out
            if integrity(tarball) != expected:
                raise SystemExit(f"{spec}: the tarball's hash is not the pinned one; refusing it")
            with tarfile.open(tarball) as tar:
                _extract(tar, Path(tmp) / _folder(spec))
            package = Path(tmp) / _folder(spec) / "package"
            for pattern in keep:
                for src in package.glob(pattern):
                    dst = ASSETS / _folder(spec) / src.relative_to(package)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
            print(f"book assets: {spec}")
    STAMP.write_text(repr(sorted(PACKAGES)))


# --- the Sphinx extension ---------------------------------------------------------------------

def _configure(app, config) -> None:
    if not STAMP.is_file():
        raise RuntimeError(
            f"the offline book assets are missing from {ASSETS}: run "
            "`python scripts/book_assets.py` (make book does it)")
    config.mathjax_path = MATHJAX
    config.nb_ipywidgets_js = {
        REQUIRE: {},
        EMBED: {},  # its bundle holds the built-in widgets, the only ones the book uses
    }


def _copy_assets(app, exception) -> None:
    if exception is None and app.builder.format == "html":
        shutil.copytree(ASSETS, Path(app.outdir) / "_static" / "offline", dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(".complete"))


def _page_scripts(app, pagename, templatename, context, doctree) -> None:
    """Remove duplicated scripts; point the widget manager's lazily loaded files (its icon
    fonts) at the build; give the theme its default colour mode."""
    context.setdefault("default_mode", "auto")
    scripts = context.get("script_files")
    if scripts is None:
        return
    seen, unique = set(), []
    for script in scripts:
        key = (getattr(script, "filename", script) or "",
               tuple(sorted(getattr(script, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    for i, script in enumerate(unique):
        if getattr(script, "filename", None) == f"_static/{EMBED}":
            # RequireJS resolves the manager's modules, and with them the files they load,
            # against the page's folder unless told where they are.
            where = context["pathto"](f"_static/{EMBED.rsplit('/', 1)[0]}", 1)
            body = f'require.config({{paths: {{"{EMBED_ID}": "{where}"}}}});' + MATHJAX2_SHIM
            unique.insert(i, type(script)("", priority=script.priority, body=body))
            break
    scripts[:] = unique


def setup(app):
    app.connect("config-inited", _configure, priority=900)
    app.connect("html-page-context", _page_scripts, priority=900)
    app.connect("build-finished", _copy_assets)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


if __name__ == "__main__":
    fetch()
    sys.exit(0)
