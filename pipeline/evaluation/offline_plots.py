"""``dvc plots show`` that works offline (``make plots``): DVC's HTML loads vega, vega-lite and vega-embed
from a CDN, so its charts are blank without a network. This writes an HTML template with the three
libraries inlined (installed from the npm registry at set-up time by ``make plots``, the versions DVC's
own page asks for) and passes it to ``dvc plots show --html-template``.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

# What dvc_render loads from its CDN (vega 5.20.2 there; vega-lite 5.2.0 needs vega >= 5.21 from npm).
LIBRARIES = {"vega": "5.22.1", "vega-lite": "5.2.0", "vega-embed": "6.18.2"}
BUILDS = {"vega": "build/vega.min.js", "vega-lite": "build/vega-lite.min.js", "vega-embed": "build/vega-embed.min.js"}

HEAD = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>UIR-LoRA plots (offline)</title>
"""
BODY = """    <style>table { border-spacing: 15px; }</style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def offline_template(node_modules: Path) -> str:
    """The page template with the chart libraries inline. It has no ``{scripts}`` placeholder, so DVC's CDN
    tags have nowhere to go; ``{refresh_tag}`` and ``{plot_divs}`` are DVC's."""
    scripts = []
    for name, build in BUILDS.items():
        file = node_modules / name / build
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing: run `make plots` (it installs {name}@{LIBRARIES[name]} from npm)")
        code = file.read_text(encoding="utf-8").replace("</script", "<\\/script")  # cannot end the tag early
        scripts.append(f"    <script>\n{code}\n    </script>\n")
    return HEAD + "".join(scripts) + BODY


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--node-modules", type=Path, default=Path(".plots/node_modules"))
    parser.add_argument("--out", default="reports/plots_html", help="folder for index.html (and the images it shows)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        template = Path(tmp) / "template.html"
        template.write_text(offline_template(args.node_modules), encoding="utf-8")
        subprocess.run(["dvc", "plots", "show", "--html-template", str(template), "-o", args.out], check=True)
    print(f"offline plots: {Path(args.out) / 'index.html'}")


if __name__ == "__main__":
    main()
