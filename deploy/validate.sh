#!/usr/bin/env bash
# Validates Kubernetes manifests offline, as CI does.
#
#   deploy/validate.sh [FILE...]     (no FILE: deploy/crds.yaml deploy/bosun.yaml)
#
# Built-in kinds, CustomResourceDefinitions included, are checked with the
# Python package kubernetes-validate against the Kubernetes $K8S_VERSION schemas,
# strictly (an unknown field is an error, as with kubectl's default
# server-side field validation). Istio kinds are checked against the
# openAPIV3Schema of their CRD in deploy/crds.yaml (or in a FILE), also
# strictly; their CEL rules (x-kubernetes-validations) are not evaluated.
# A kind with neither a built-in schema nor a CRD is an error, as is a YAML
# error, a duplicate key or an object without apiVersion, kind or
# metadata.name. Each error names the file, line, document and field; the
# exit status is 1 if there was any.
#
# Installs kubernetes-validate (pip; python3-pip with apt-get if pip is
# missing) when it is not importable. Environment: K8S_VERSION (default 1.32,
# the oldest Kubernetes that Istio 1.30, whose CRDs these are, supports).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
K8S_VERSION=${K8S_VERSION:-1.32}
KV_PACKAGE=kubernetes-validate==1.37.0 # has schemas for Kubernetes 1.25 to 1.37

if [ $# -eq 0 ]; then
    set -- "$here/crds.yaml" "$here/bosun.yaml"
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_INPUT=1

apt_install() {
    if ! command -v apt-get >/dev/null; then
        echo "validate.sh: need $*, and there is no apt-get to install it" >&2
        exit 2
    fi
    echo "validate.sh: installing $* with apt-get" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# True when kubernetes-validate imports and has schemas for $K8S_VERSION.
validator_ready() {
    python3 - "$K8S_VERSION" >/dev/null 2>&1 <<'PY'
import sys
import kubernetes_validate.utils as u
sys.exit(0 if sys.argv[1] in [u.major_minor(v) for v in u.all_versions()] else 1)
PY
}

if ! command -v python3 >/dev/null; then
    apt_install python3 python3-pip
fi
if ! validator_ready; then
    if ! python3 -m pip --version >/dev/null 2>&1; then
        apt_install python3-pip
    fi
    echo "validate.sh: installing $KV_PACKAGE with pip" >&2
    if ! out=$(python3 -m pip install --quiet --no-warn-script-location "$KV_PACKAGE" 2>&1); then
        if grep -q externally-managed-environment <<<"$out"; then
            # PEP 668 (Debian 12, Ubuntu 23.04 and later): this is a CI
            # machine's own python, so install into it anyway.
            python3 -m pip install --quiet --no-warn-script-location --break-system-packages "$KV_PACKAGE"
        else
            printf '%s\n' "$out" >&2
            exit 2
        fi
    fi
    if ! validator_ready; then
        echo "validate.sh: kubernetes-validate has no schemas for Kubernetes $K8S_VERSION" >&2
        exit 2
    fi
fi

exec python3 - "$K8S_VERSION" "$here/crds.yaml" "$@" <<'PY'
import sys

import jsonschema
import yaml
import kubernetes_validate
from kubernetes_validate import utils as kvu

k8s_version, crd_file, files = sys.argv[1], sys.argv[2], sys.argv[3:]
errors = 0
cel_rules_seen = False


def short(text, limit=400):
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + " ..."


Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
parsed = {}


def documents(path):
    """[(index, node, data)] for each YAML document; raises OSError or
    yaml.YAMLError."""
    if path not in parsed:
        try:
            with open(path) as f:
                loader = Loader(f.read())
            docs = []
            try:
                while loader.check_node():
                    node = loader.get_node()
                    docs.append((len(docs) + 1, node, loader.construct_document(node)))
            finally:
                loader.dispose()
            parsed[path] = docs
        except (OSError, yaml.YAMLError) as e:
            parsed[path] = e
    if isinstance(parsed[path], Exception):
        raise parsed[path]
    return parsed[path]


def duplicate_keys(node, found):
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in seen:
                    found.append((key.start_mark.line + 1, key.value))
                seen.add(key.value)
            duplicate_keys(value, found)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            duplicate_keys(item, found)
    return found


def line_of(node, path):
    """The line of the deepest node along a jsonschema error path."""
    line = node.start_mark.line + 1
    for step in path:
        nxt = None
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == str(step):
                    nxt = value
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(step, int):
            if step < len(node.value):
                nxt = node.value[step]
        if nxt is None:
            break
        node = nxt
        line = node.start_mark.line + 1
    return line


def to_jsonschema(s):
    """A CRD's openAPIV3Schema as a JSON schema (draft 4): nullable made a
    type, x-kubernetes-* dropped, unknown fields refused where Kubernetes
    would prune them (no x-kubernetes-preserve-unknown-fields)."""
    global cel_rules_seen
    out = {}
    for key, value in s.items():
        if key in ("properties", "patternProperties"):
            out[key] = {k: to_jsonschema(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = to_jsonschema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [to_jsonschema(v) for v in value]
        elif key == "x-kubernetes-validations":
            cel_rules_seen = True
        elif key.startswith("x-kubernetes-") or key == "nullable":
            pass
        else:
            out[key] = value
    if s.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if (
        s.get("type") == "object"
        and "properties" in s
        and "additionalProperties" not in s
        and not s.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
    },
}


def custom_resource_schema(version_schema):
    schema = to_jsonschema(version_schema)
    props = dict(schema.get("properties", {}))
    props.update(apiVersion={"type": "string"}, kind={"type": "string"}, metadata=METADATA)
    schema["properties"] = props
    schema["additionalProperties"] = False
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


# (group, kind) -> {served version: its openAPIV3Schema}
crds = {}
validators = {}


def add_crd(obj):
    spec = obj.get("spec") or {}
    group, kind = spec.get("group"), (spec.get("names") or {}).get("kind")
    crds[(group, kind)] = {
        v.get("name"): ((v.get("schema") or {}).get("openAPIV3Schema")) or {"type": "object"}
        for v in spec.get("versions") or []
        if v.get("served")
    }
    for key in [k for k in validators if k[:2] == (group, kind)]:
        del validators[key]


def validator_for(group, kind, version):
    """The validator for a served version (None if not served), or why the
    CRD's schema is unusable (a string); made on first use."""
    key = (group, kind, version)
    if key not in validators:
        schema = crds[(group, kind)].get(version)
        try:
            validators[key] = None if schema is None else custom_resource_schema(schema)
        except Exception as e:  # noqa: BLE001 - reported with the resource
            validators[key] = "the CRD's %s schema is not usable: %s" % (version, short(e))
    return validators[key]


def report(path, line, index, what, field, message):
    global errors
    errors += 1
    where = "%s:%d" % (path, line) if line else path
    if index:
        where += ": document %d" % index
    if what:
        where += " (%s)" % what
    print("ERROR %s: %s%s" % (where, field + ": " if field else "", short(message)))


def is_crd(data):
    return (
        isinstance(data, dict)
        and data.get("kind") == "CustomResourceDefinition"
        and str(data.get("apiVersion", "")).startswith("apiextensions.k8s.io/")
    )


# CRDs first: deploy/crds.yaml, then any in the files (those replace them).
for path in [crd_file] + files:
    try:
        for _, _, data in documents(path):
            if is_crd(data):
                add_crd(data)
    except (OSError, yaml.YAMLError):
        pass  # reported below

total = custom_resources = 0
for path in files:
    try:
        docs = documents(path)
    except OSError as e:
        report(path, 0, 0, None, None, "cannot read: %s" % (e.strerror or e))
        continue
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        report(path, mark.line + 1 if mark else 0, 0, None, None, "YAML: %s" % short(e))
        continue
    count = 0
    for index, node, data in docs:
        if data is None:
            continue  # an empty document, as kubectl skips it
        count += 1
        line = node.start_mark.line + 1
        for dup_line, key in duplicate_keys(node, []):
            report(path, dup_line, index, None, key, "duplicate key")
        if not isinstance(data, dict):
            report(path, line, index, None, None, "not a mapping")
            continue
        api_version, kind = data.get("apiVersion"), data.get("kind")
        meta = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
        name = meta.get("name")
        what = "%s %s%s" % (kind, meta["namespace"] + "/" if meta.get("namespace") else "",
                            name if isinstance(name, str) and name else "(no name)")
        if not isinstance(api_version, str) or not isinstance(kind, str):
            report(path, line, index, what, None, "apiVersion and kind must be strings")
            continue
        if not isinstance(name, str) or not name:
            report(path, line, index, what, "metadata.name", "missing")
        group, _, version = api_version.rpartition("/")
        if (group, kind) in crds:
            validator = validator_for(group, kind, version)
            if validator is None:
                report(path, line, index, what, "apiVersion",
                       "%s is not a served version of its CRD (served: %s)"
                       % (version, ", ".join(sorted(crds[(group, kind)])) or "none"))
            elif isinstance(validator, str):
                report(path, line, index, what, None, validator)
            else:
                for e in sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.path))):
                    report(path, line_of(node, e.path), index, what,
                           ".".join(map(str, e.path)), e.message)
            custom_resources += 1
            continue
        try:
            kubernetes_validate.validate(data, k8s_version, strict=True)
        except kvu.ValidationError as e:
            report(path, line_of(node, e.path), index, what, ".".join(map(str, e.path)), e.message)
        except kvu.SchemaNotFoundError:
            report(path, line, index, what, None,
                   "no schema for %s %s in Kubernetes %s and no CRD for it"
                   % (kind, api_version, k8s_version))
        except kvu.VersionNotSupportedError:
            sys.exit("validate.sh: kubernetes-validate %s has no Kubernetes %s"
                     % (kubernetes_validate.__version__, k8s_version))
        except Exception as e:  # noqa: BLE001 - a schema the package cannot use
            report(path, line, index, what, None, "could not be validated: %s" % short(e))
    total += count
    print("checked %s: %d objects" % (path, count))

if cel_rules_seen and custom_resources:
    print("note: CRD CEL rules (x-kubernetes-validations) were not evaluated")
print("%s: %d objects in %d files, %d errors (Kubernetes %s schemas, kubernetes-validate %s, strict)"
      % ("FAILED" if errors else "ok", total, len(files), errors, k8s_version,
         kubernetes_validate.__version__))
sys.exit(1 if errors else 0)
PY
