#!/usr/bin/env bash
# Publish a crux_workers signal with nothing but redis-cli and openssl: the wire format
# of docs/signals.md, from a shell. Usage:
#   scripts/publish_signal.sh REDIS_URL FLOW_ID NAME PAYLOAD_JSON [KEY]
# The queue is $CRUX_SIGNAL_QUEUE (default crux.signals); with $CRUX_SIGNAL_SECRET set,
# the message is signed (HMAC-SHA256 over the exact body bytes).
set -euo pipefail

url=$1 flow_id=$2 name=$3 payload=$4 key=${5:-}
queue=${CRUX_SIGNAL_QUEUE:-crux.signals}

# Flow ids, names and keys are used verbatim: keep them free of quotes and backslashes.
body="{\"flow_id\":\"$flow_id\",\"name\":\"$name\",\"payload\":$payload"
if [ -n "$key" ]; then body="$body,\"key\":\"$key\""; fi
body="$body}"

headers="{}"
if [ -n "${CRUX_SIGNAL_SECRET:-}" ]; then
    mac=$(printf '%s' "$body" | openssl dgst -sha256 -hmac "$CRUX_SIGNAL_SECRET" | sed 's/^.*= //')
    headers="{\"crux-signature\":\"sha256=$mac\"}"
fi

# The body travels as a JSON string inside the envelope: escape it once more.
escaped=$(printf '%s' "$body" | sed 's/\\/\\\\/g; s/"/\\"/g')
tag="sh-$(date +%s%N)-$$"
envelope="{\"body\":\"$escaped\",\"content-type\":\"application/json\",\"content-encoding\":\"utf-8\",\"headers\":$headers,\"properties\":{\"delivery_tag\":\"$tag\",\"delivery_info\":{\"exchange\":\"\",\"routing_key\":\"$queue\"},\"priority\":0}}"

redis-cli -u "$url" LPUSH "$queue" "$envelope" >/dev/null
echo "published $name for $flow_id on $queue"
