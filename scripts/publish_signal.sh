#!/usr/bin/env bash
# Publish a crux_workers signal with nothing but redis-cli and openssl: the wire format
# (v2) of docs/signals.md, from a shell. Usage:
#   scripts/publish_signal.sh REDIS_URL FLOW_ID NAME PAYLOAD_JSON [KEY]
# The queue is $CRUX_SIGNAL_QUEUE (default crux.signals). Without KEY a fresh one is
# made (sh-<random hex>), so a redelivered or replayed message is recorded once. With
# $CRUX_SIGNAL_SECRET set, the message is signed: header crux-timestamp (Unix seconds)
# and crux-signature "v2=" + HMAC-SHA256 of "crux-signal-v2\n<timestamp>\n<body>".
set -euo pipefail

url=$1 flow_id=$2 name=$3 payload=$4 key=${5:-}
queue=${CRUX_SIGNAL_QUEUE:-crux.signals}
if [ -z "$key" ]; then key="sh-$(openssl rand -hex 16)"; fi

# Flow ids, names and keys are used verbatim: keep them free of quotes and backslashes.
body="{\"v\":2,\"flow_id\":\"$flow_id\",\"name\":\"$name\",\"payload\":$payload,\"key\":\"$key\"}"

headers="{}"
if [ -n "${CRUX_SIGNAL_SECRET:-}" ]; then
    ts=$(date +%s)
    mac=$(printf 'crux-signal-v2\n%s\n%s' "$ts" "$body" \
        | openssl dgst -sha256 -hmac "$CRUX_SIGNAL_SECRET" | sed 's/^.*= //')
    headers="{\"crux-timestamp\":\"$ts\",\"crux-signature\":\"v2=$mac\"}"
fi

# The body travels as a JSON string inside the envelope: escape it once more.
escaped=$(printf '%s' "$body" | sed 's/\\/\\\\/g; s/"/\\"/g')
tag="sh-$(date +%s%N)-$$"
envelope="{\"body\":\"$escaped\",\"content-type\":\"application/json\",\"content-encoding\":\"utf-8\",\"headers\":$headers,\"properties\":{\"delivery_tag\":\"$tag\",\"delivery_info\":{\"exchange\":\"\",\"routing_key\":\"$queue\"},\"priority\":0}}"

redis-cli -u "$url" LPUSH "$queue" "$envelope" >/dev/null
echo "published $name for $flow_id on $queue (key $key)"
