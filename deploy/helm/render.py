#!/usr/bin/env python3
"""Renders the etlmesh chart with Helm's own library, offline (PyPI's helm-python-sdk:
Helm 4's Go code as a shared library, no helm binary, no cluster), and prints the
manifests as one YAML stream, sorted by template.

    pip install helm-python-sdk
    python3 deploy/helm/render.py [VALUES_JSON] > manifests.yaml
    pip install kubernetes-validate && kubernetes-validate --strict manifests.yaml

VALUES_JSON overrides values.yaml (e.g. '{"broker": {"enabled": true}}'). Exit status 2
when helm-python-sdk is not installed, 1 when the chart does not render.
"""
import json
import os
import sys

try:
    from helm_python import Chart
except ImportError:
    print("helm-python-sdk is not installed: pip install helm-python-sdk", file=sys.stderr)
    sys.exit(2)

CHART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "etlmesh")


def main() -> int:
    values = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    try:
        chart = Chart.load(CHART)
        rendered = chart.render(values, name="test", namespace="etlmesh", is_install=True)
    except Exception as e:  # noqa: BLE001 - the library's errors name the template
        print(f"the chart does not render: {e}", file=sys.stderr)
        return 1
    for path in sorted(rendered):
        text = rendered[path].strip()
        if not path.endswith((".yaml", ".yml")) or not text:
            continue
        print(f"---\n# Source: {path}\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
