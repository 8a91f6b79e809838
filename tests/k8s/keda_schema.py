"""A JSON Schema of the KEDA objects this project writes, from KEDA's documentation.

KEDA's CRDs are not in the cluster these tests run in (there is none), and
kubernetes-validate knows only Kubernetes' own kinds, so the ScaledObjects of k8s/ are
checked against this: every field KEDA documents for a ScaledObject (keda.sh/v1alpha1),
with its type and allowed values, and for the four scalers used here the trigger metadata
each documents, required and optional, nothing else. Written from the KEDA 2.17 docs:
reference/scaledobject-spec, scalers/metrics-api, scalers/prometheus, scalers/redis-lists
and scalers/rabbitmq-queue; HPA behavior fields from Kubernetes' autoscaling/v2.
``semantic_errors`` adds the rules the docs state in words.
"""

from __future__ import annotations

NUMBER = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"}  # KEDA: targets are strings, may be floats
INTEGER_STRING = {"type": "string", "pattern": r"^[0-9]+$"}
BOOL_STRING = {"enum": ["true", "false"]}
STRING = {"type": "string", "minLength": 1}

_SCALING_RULES = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "stabilizationWindowSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
        "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
        "policies": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["type", "value", "periodSeconds"],
                "properties": {
                    "type": {"enum": ["Pods", "Percent"]},
                    "value": {"type": "integer", "minimum": 1},
                    "periodSeconds": {"type": "integer", "minimum": 1, "maximum": 1800},
                },
            },
        },
    },
}


def _metadata(required: list[str], optional: dict) -> dict:
    properties = {name: STRING for name in required} | optional
    return {"type": "object", "additionalProperties": False, "required": required, "properties": properties}


#: Trigger metadata by scaler type: what each scaler's page lists.
SCALER_METADATA = {
    "metrics-api": _metadata(
        ["url", "valueLocation", "targetValue"],
        {
            "url": {"type": "string", "pattern": r"^https?://"},
            "targetValue": NUMBER,
            "activationTargetValue": NUMBER,
            "format": {"enum": ["json", "xml", "yaml", "prometheus"]},
            "unsafeSsl": BOOL_STRING,
            "aggregateFromKubeServiceEndpoints": BOOL_STRING,
            "aggregationType": {"enum": ["average", "sum", "max", "min"]},
            "authMode": STRING,
            "method": {"enum": ["header", "query"]},
            "keyParamName": STRING,
        },
    ),
    "prometheus": _metadata(
        ["serverAddress", "query", "threshold"],
        {
            "serverAddress": {"type": "string", "pattern": r"^https?://"},
            "threshold": NUMBER,
            "activationThreshold": NUMBER,
            "namespace": STRING,
            "customHeaders": STRING,
            "ignoreNullValues": BOOL_STRING,
            "queryParameters": STRING,
            "unsafeSsl": BOOL_STRING,
            "authModes": STRING,
        },
    ),
    "redis": {
        **_metadata(
            ["listName", "listLength"],
            {
                "listLength": INTEGER_STRING,
                "activationListLength": INTEGER_STRING,
                "address": {"type": "string", "pattern": r"^[^:/]+:[0-9]+$"},  # host:port
                "host": STRING,
                "port": INTEGER_STRING,
                "addressFromEnv": STRING,
                "hostFromEnv": STRING,
                "portFromEnv": STRING,
                "usernameFromEnv": STRING,
                "passwordFromEnv": STRING,
                "enableTLS": BOOL_STRING,
                "unsafeSsl": BOOL_STRING,
                "databaseIndex": INTEGER_STRING,
            },
        ),
        "anyOf": [{"required": [key]} for key in ("address", "host", "addressFromEnv", "hostFromEnv")],
    },
    "rabbitmq": {
        **_metadata(
            ["queueName"],
            {
                "host": STRING,
                "hostFromEnv": STRING,
                "protocol": {"enum": ["auto", "http", "amqp"]},
                "mode": {"enum": ["QueueLength", "MessageRate"]},
                "value": NUMBER,
                "activationValue": NUMBER,
                "vhostName": STRING,
                "useRegex": BOOL_STRING,
                "pageSize": INTEGER_STRING,
                "operation": {"enum": ["sum", "max", "avg"]},
                "timeout": INTEGER_STRING,
                "excludeUnacknowledged": BOOL_STRING,
                "unsafeSsl": BOOL_STRING,
                "usernameFromEnv": STRING,
                "passwordFromEnv": STRING,
            },
        ),
        "required": ["queueName", "mode", "value"],
        "anyOf": [{"required": ["host"]}, {"required": ["hostFromEnv"]}],
    },
}

TRIGGER = {
    "type": "object",
    "additionalProperties": False,
    "required": ["type", "metadata"],
    "properties": {
        "type": {"enum": sorted(SCALER_METADATA)},
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
        "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
        "useCachedMetrics": {"type": "boolean"},
        "authenticationRef": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name"],
            "properties": {"name": STRING, "kind": {"enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]}},
        },
    },
    "allOf": [
        {"if": {"properties": {"type": {"const": kind}}}, "then": {"properties": {"metadata": schema}}}
        for kind, schema in SCALER_METADATA.items()
    ],
}

SCALED_OBJECT = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": STRING, "namespace": STRING, "labels": {"type": "object"}},
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {
                        "name": STRING,
                        "apiVersion": STRING,
                        "kind": STRING,
                        "envSourceContainerName": STRING,
                    },
                },
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                # "the only supported value for this property is 0"
                "idleReplicaCount": {"const": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "fallback": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["failureThreshold", "replicas"],
                    "properties": {
                        "failureThreshold": {"type": "integer", "minimum": 1},
                        "replicas": {"type": "integer", "minimum": 0},
                    },
                },
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "name": STRING,
                                "behavior": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {"scaleUp": _SCALING_RULES, "scaleDown": _SCALING_RULES},
                                },
                            },
                        },
                        "scalingModifiers": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["target", "formula"],
                            "properties": {
                                "target": NUMBER,
                                "activationTarget": NUMBER,
                                "metricType": {"enum": ["AverageValue", "Value"]},
                                "formula": STRING,
                            },
                        },
                    },
                },
                "triggers": {"type": "array", "minItems": 1, "items": TRIGGER},
            },
        },
    },
}


def semantic_errors(scaled_object: dict) -> list[str]:
    """The rules KEDA's docs state in words rather than types."""
    spec, errors = scaled_object["spec"], []
    low, high = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
    if low > high:
        errors.append(f"minReplicaCount {low} > maxReplicaCount {high}")
    if "idleReplicaCount" in spec and not spec["idleReplicaCount"] < low:
        errors.append("idleReplicaCount must be less than minReplicaCount")
    names = [t.get("name") for t in spec["triggers"] if t.get("name")]
    if len(names) != len(set(names)):
        errors.append(f"trigger names repeat: {names}")
    for trigger in spec["triggers"]:
        meta = trigger["metadata"]
        if trigger.get("metricType") == "Utilization":
            errors.append(f"{trigger['type']}: Utilization is for the cpu and memory scalers only")
        if trigger["type"] == "rabbitmq" and meta.get("mode") == "MessageRate" and meta.get("protocol") != "http":
            errors.append("rabbitmq: mode MessageRate requires protocol http")
        if trigger["type"] == "rabbitmq" and meta.get("excludeUnacknowledged") and meta.get("protocol") != "http":
            errors.append("rabbitmq: excludeUnacknowledged applies to protocol http only")
    return errors
