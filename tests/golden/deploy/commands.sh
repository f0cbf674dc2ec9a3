#!/bin/sh
# The flyctl commands of this deploy, in order (secret values shown as ***; jq reads the new volume ids).
set -eu

# app: create the app kefu (only when the app does not exist)
fly apps create kefu --org personal

# ipv4: allocate a dedicated IPv4 (UDP is not carried on shared IPv4s) (only when the app has no dedicated IPv4)
fly ips allocate-v4 --app kefu --yes

# ipv6: allocate an IPv6 (only when the app has no IPv6)
fly ips allocate-v6 --app kefu

# secrets: set the cluster's secrets (API key, token key, cluster CA and its key), made locally (only when the app lacks any of them; only those are set)
fly secrets set --app kefu --stage KEFU_API_KEY=*** KEFU_TOKEN_KEY=*** KEFU_CLUSTER_CA=*** KEFU_CLUSTER_CA_KEY=***

# image: build Dockerfile and push it as registry.fly.io/kefu:kefu-golden
fly deploy --app kefu --dockerfile Dockerfile --build-only --push --image-label kefu-golden

# volume-iad-1: create volume kefu_data (3 GB) for node 1 in iad (only when the region has fewer volumes than nodes)
VOLUME_ID=$(fly volumes create kefu_data --app kefu --region iad --size 3 --yes --json | jq -r .id)

# machine-iad-1: start node 1 in iad from machines/iad.json (an existing one is updated, one at a time)
fly machine run registry.fly.io/kefu:kefu-golden --app kefu --region iad --vm-size=shared-cpu-1x --vm-memory=512 --env=KEFU_ADMIN_ADDR=0.0.0.0:9090 --env=KEFU_CLUSTER_CA=/etc/kefu/ca.pem --env=KEFU_DATA_DIR=/data --env=KEFU_JIM_ADDR=0.0.0.0:8888 --env=KEFU_LOG=info '--env=KEFU_MESH_ADDR=[::]:7443' --env=KEFU_PEERS_DNS=vms.kefu.internal --env=KEFU_PROFILE=prod --env=KEFU_QUIC_ADDR=fly-global-services:8443 --env=KEFU_TLS_ADDR=0.0.0.0:8443 --file-secret=/etc/kefu/ca.pem=KEFU_CLUSTER_CA --file-secret=/etc/kefu/ca.key=KEFU_CLUSTER_CA_KEY "--volume=$VOLUME_ID:/data" --port=80:8888/tcp:http --port=443:8888/tcp:tls,http --port=8888:8888/tcp --port=8443:8443/tcp --port=8443:8443/udp --restart=always --autostop=off --detach

# volume-fra-1: create volume kefu_data (3 GB) for node 1 in fra (only when the region has fewer volumes than nodes)
VOLUME_ID=$(fly volumes create kefu_data --app kefu --region fra --size 3 --yes --json | jq -r .id)

# machine-fra-1: start node 1 in fra from machines/fra.json (an existing one is updated, one at a time)
fly machine run registry.fly.io/kefu:kefu-golden --app kefu --region fra --vm-size=shared-cpu-1x --vm-memory=512 --env=KEFU_ADMIN_ADDR=0.0.0.0:9090 --env=KEFU_CLUSTER_CA=/etc/kefu/ca.pem --env=KEFU_DATA_DIR=/data --env=KEFU_JIM_ADDR=0.0.0.0:8888 --env=KEFU_LOG=info '--env=KEFU_MESH_ADDR=[::]:7443' --env=KEFU_PEERS_DNS=vms.kefu.internal --env=KEFU_PROFILE=prod --env=KEFU_QUIC_ADDR=fly-global-services:8443 --env=KEFU_TLS_ADDR=0.0.0.0:8443 --file-secret=/etc/kefu/ca.pem=KEFU_CLUSTER_CA --file-secret=/etc/kefu/ca.key=KEFU_CLUSTER_CA_KEY "--volume=$VOLUME_ID:/data" --port=80:8888/tcp:http --port=443:8888/tcp:tls,http --port=8888:8888/tcp --port=8443:8443/tcp --port=8443:8443/udp --restart=always --autostop=off --detach

# volume-sin-1: create volume kefu_data (3 GB) for node 1 in sin (only when the region has fewer volumes than nodes)
VOLUME_ID=$(fly volumes create kefu_data --app kefu --region sin --size 3 --yes --json | jq -r .id)

# machine-sin-1: start node 1 in sin from machines/sin.json (an existing one is updated, one at a time)
fly machine run registry.fly.io/kefu:kefu-golden --app kefu --region sin --vm-size=shared-cpu-1x --vm-memory=512 --env=KEFU_ADMIN_ADDR=0.0.0.0:9090 --env=KEFU_CLUSTER_CA=/etc/kefu/ca.pem --env=KEFU_DATA_DIR=/data --env=KEFU_JIM_ADDR=0.0.0.0:8888 --env=KEFU_LOG=info '--env=KEFU_MESH_ADDR=[::]:7443' --env=KEFU_PEERS_DNS=vms.kefu.internal --env=KEFU_PROFILE=prod --env=KEFU_QUIC_ADDR=fly-global-services:8443 --env=KEFU_TLS_ADDR=0.0.0.0:8443 --file-secret=/etc/kefu/ca.pem=KEFU_CLUSTER_CA --file-secret=/etc/kefu/ca.key=KEFU_CLUSTER_CA_KEY "--volume=$VOLUME_ID:/data" --port=80:8888/tcp:http --port=443:8888/tcp:tls,http --port=8888:8888/tcp --port=8443:8443/tcp --port=8443:8443/udp --restart=always --autostop=off --detach
