#!/usr/bin/env bash
# Creates the Secrets that deploy/k8s expects in a namespace, those that do not exist yet,
# with random passwords and keys that agree with each other (README.md, "Secrets"):
#
#   deploy/k8s/make-secrets.sh [options] NAMESPACE [PREFIX]
#
#   NAMESPACE  where the overlay deploys (fleetline for prod, fleetline-dev for dev); it
#              must exist: `kubectl apply -f deploy/k8s/overlays/prod/namespace.yaml`
#   PREFIX     the overlay's namePrefix, part of the in-cluster host names (prod-, dev-);
#              by default prod- in fleetline and dev- in fleetline-dev
#   --database-url URL  an external PostgreSQL/TimescaleDB instead of the in-cluster one
#              (components/timescaledb removed from the overlay): the services' URL as
#              given; Grafana and the broker get accounts of their own on the same server
#   --mqtt-host NAME    the name (or address) devices reach the broker by, put in its TLS
#              certificate (default mqtt.example.org, a placeholder)
#   --ca-dir DIR        where the devices' CA is kept: ca.crt and ca.key are made there
#              unless they exist, and sign the broker's certificate
#              (default ~/.config/fleetline/ca-NAMESPACE, outside any repository)
#   --no-tls            leave fleetline-mosquitto-tls to cert-manager (components/cert-manager)
#
# An existing Secret is never changed: the script says which it kept and which it
# created, and prints no secret value. Where a new Secret must agree with one that exists
# (the services' broker passwords and their hashes; the database passwords and the URLs
# that carry them), it reads the existing one, and it refuses what it cannot make agree.
# KUBECTL names the kubectl to run (default: kubectl on PATH).
set -euo pipefail

me=$(basename "$0")
die() { echo "$me: $*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

kubectl=${KUBECTL:-kubectl}
database_url=
mqtt_host=mqtt.example.org
ca_dir=
tls=yes
args=()
while (($#)); do
    case $1 in
        --database-url) (($# >= 2)) || die "--database-url needs a URL"; database_url=$2; shift 2 ;;
        --database-url=*) database_url=${1#*=}; shift ;;
        --mqtt-host) (($# >= 2)) || die "--mqtt-host needs a name"; mqtt_host=$2; shift 2 ;;
        --mqtt-host=*) mqtt_host=${1#*=}; shift ;;
        --ca-dir) (($# >= 2)) || die "--ca-dir needs a directory"; ca_dir=$2; shift 2 ;;
        --ca-dir=*) ca_dir=${1#*=}; shift ;;
        --no-tls) tls=no; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; args+=("$@"); break ;;
        -*) die "unknown option $1 (--help)" ;;
        *) args+=("$1"); shift ;;
    esac
done
((${#args[@]} >= 1 && ${#args[@]} <= 2)) || die "usage: $me [options] NAMESPACE [PREFIX] (--help)"
ns=${args[0]}
if ((${#args[@]} == 2)); then
    prefix=${args[1]}
else
    case $ns in
        fleetline) prefix=prod- ;;
        fleetline-dev) prefix=dev- ;;
        *) die "give the overlay's name prefix after the namespace (prod- or dev-)" ;;
    esac
fi
ca_dir=${ca_dir:-${XDG_CONFIG_HOME:-$HOME/.config}/fleetline/ca-$ns}

command -v openssl >/dev/null || die "openssl is needed (random values, the broker's certificate)"
if command -v sha256sum >/dev/null; then
    sha256_hex() { sha256sum | cut -d' ' -f1; }
else
    sha256_hex() { shasum -a 256 | cut -d' ' -f1; }
fi
# Hex: safe in URLs, libpq service files and SQL as is.
random_hex() { openssl rand -hex "$1"; }
# Runs a command, showing its output only when it fails (openssl talks on stderr).
quiet() {
    local out
    if ! out=$("$@" 2>&1); then
        printf '%s\n' "$out" >&2
        return 1
    fi
}

"$kubectl" get namespace "$ns" -o name >/dev/null \
    || die "no namespace $ns: apply the overlay's namespace.yaml first (README.md)"

exists() {
    local found
    found=$("$kubectl" -n "$ns" get secret "$1" --ignore-not-found -o name) \
        || die "cannot read Secret $1 in $ns (kubectl failed): nothing was changed for it"
    [[ -n $found ]]
}
# The decoded value of one key of an existing Secret.
secret_value() { "$kubectl" -n "$ns" get secret "$1" -o "jsonpath={.data.${2//./\\.}}" | base64 -d; }

umask 077
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Values go to the Secrets through files, never through command lines (which other users
# of the machine can read) or this script's output. printf '%s': no trailing newline,
# which would be part of the value.
put() { printf '%s' "$2" >"$work/$1"; }

created=()
kept=()
create() {
    local name=$1
    shift
    "$kubectl" -n "$ns" create secret generic "$name" "$@" >/dev/null
    created+=("$name")
}

# The Secrets that exist already, space-separated (plain variables and indexed arrays
# only: macOS still ships bash 3.2).
present=" "
for name in fleetline fleetline-mqtt fleetline-device-key fleetline-mosquitto-auth \
    fleetline-grafana fleetline-mosquitto-tls fleetline-timescaledb fleetline-release-key; do
    if exists "$name"; then present+="$name "; fi
done
has() { [[ $present == *" $1 "* ]]; }

# --- Where the database is, and the passwords that must agree ----------------------------
if [[ -z $database_url ]]; then
    in_cluster=yes
    db_host=${prefix}fleetline-timescaledb
    db_port=5432
    db_name=fleetline
    # Inside the cluster, behind the database's NetworkPolicy; the image serves no TLS.
    db_sslmode=disable
    if has fleetline-timescaledb; then
        db_password=$(secret_value fleetline-timescaledb FLEETLINE_DB_PASSWORD)
        broker_db_password=$(secret_value fleetline-timescaledb FLEETLINE_BROKER_DB_PASSWORD)
        [[ -n $db_password && -n $broker_db_password ]] \
            || die "fleetline-timescaledb lacks FLEETLINE_DB_PASSWORD or FLEETLINE_BROKER_DB_PASSWORD (README.md)"
    elif has fleetline || has fleetline-mosquitto-auth; then
        die "fleetline or fleetline-mosquitto-auth exists without fleetline-timescaledb: their" \
            "database passwords would not match a new database. For an external database" \
            "give --database-url; otherwise delete them and run again"
    else
        db_password=$(random_hex 24)
        broker_db_password=$(random_hex 24)
    fi
    database_url="postgresql://fleetline:$db_password@$db_host:$db_port/$db_name"
else
    in_cluster=no
    re='^postgres(ql)?://([^@/]*@)?([^/?]*)/([^?]+)(\?(.*))?$'
    [[ $database_url =~ $re ]] || die "--database-url: expected postgresql://user:password@host[:port]/database[?sslmode=...]"
    hostport=${BASH_REMATCH[3]}
    db_name=${BASH_REMATCH[4]}
    query=${BASH_REMATCH[6]}
    if [[ $hostport =~ ^\[([0-9A-Fa-f:.]+)\](:([0-9]+))?$ || $hostport =~ ^([^:,]+)(:([0-9]+))?$ ]]; then
        db_host=${BASH_REMATCH[1]}
        db_port=${BASH_REMATCH[3]:-5432}
    else
        die "--database-url: one host, with an optional port"
    fi
    # Grafana takes these four; a URL without one (libpq's default is prefer) gets require.
    db_sslmode=require
    if [[ "&$query&" =~ \&sslmode=(disable|require|verify-ca|verify-full)\& ]]; then
        db_sslmode=${BASH_REMATCH[1]}
    fi
    # Used only when fleetline-mosquitto-auth is made.
    broker_db_password=$(random_hex 24)
fi

# --- The services' broker accounts: plaintext in fleetline-mqtt, hashed in
# --- fleetline-mosquitto-auth's mqtt-services ---------------------------------------------
broker=${prefix}fleetline-mosquitto:1883
services=(ingest api rules)
mqtt_user=()
mqtt_password=()
if has fleetline-mqtt; then
    if ! has fleetline-mosquitto-auth; then
        for i in 0 1 2; do
            svc=${services[i]}
            url=$(secret_value fleetline-mqtt "$svc")
            [[ $url =~ ^mqtts?://([^:@/]+):([^@/]+)@ ]] \
                || die "fleetline-mqtt: $svc is not mqtt://user:password@host:port; cannot derive mqtt-services"
            [[ ${BASH_REMATCH[2]} != *%* ]] \
                || die "fleetline-mqtt: $svc's password is percent-encoded; make mqtt-services by hand (README.md)"
            mqtt_user[i]=${BASH_REMATCH[1]}
            mqtt_password[i]=${BASH_REMATCH[2]}
        done
    fi
elif has fleetline-mosquitto-auth; then
    die "fleetline-mosquitto-auth exists without fleetline-mqtt: the services' passwords" \
        "cannot be read back from their hashes. Delete fleetline-mosquitto-auth and run again"
else
    for i in 0 1 2; do
        mqtt_user[i]=fleetline-${services[i]}
        mqtt_password[i]=$(random_hex 24)
    done
fi

# --- Create what is missing --------------------------------------------------------------
# The database's Secret first: it is where the others' database passwords come from,
# so a run stopped after it can be run again.
if [[ $in_cluster == no ]]; then
    :
elif ! has fleetline-timescaledb; then
    put postgres-password "$(random_hex 24)"
    put db-password "$db_password"
    put broker-db-password "$broker_db_password"
    create fleetline-timescaledb \
        --from-file=POSTGRES_PASSWORD="$work/postgres-password" \
        --from-file=FLEETLINE_DB_PASSWORD="$work/db-password" \
        --from-file=FLEETLINE_BROKER_DB_PASSWORD="$work/broker-db-password"
else
    kept+=(fleetline-timescaledb)
fi

if ! has fleetline; then
    put database-url "$database_url"
    create fleetline --from-file=FLEETLINE_DATABASE_URL="$work/database-url"
else
    kept+=(fleetline)
fi

if ! has fleetline-mqtt; then
    files=()
    for i in 0 1 2; do
        svc=${services[i]}
        put "mqtt-$svc" "mqtt://${mqtt_user[i]}:${mqtt_password[i]}@$broker"
        files+=(--from-file="$svc=$work/mqtt-$svc")
    done
    create fleetline-mqtt "${files[@]}"
else
    kept+=(fleetline-mqtt)
fi

if ! has fleetline-mosquitto-auth; then
    : >"$work/mqtt-services"
    for i in 0 1 2; do
        printf '%s:%s\n' "${mqtt_user[i]}" \
            "$(printf '%s' "${mqtt_password[i]}" | sha256_hex)" >>"$work/mqtt-services"
    done
    cat >"$work/pg_service.conf" <<EOF
[fleetline-broker]
host=$db_host
port=$db_port
dbname=$db_name
user=fleetline_broker
password=$broker_db_password
sslmode=$db_sslmode
EOF
    create fleetline-mosquitto-auth \
        --from-file=mqtt-services="$work/mqtt-services" \
        --from-file=pg_service.conf="$work/pg_service.conf"
else
    kept+=(fleetline-mosquitto-auth)
fi

if ! has fleetline-device-key; then
    # 32 random bytes, hex: the api refuses a secret under 32 bytes.
    put device-key "$(random_hex 32)"
    create fleetline-device-key --from-file=device-key-secret="$work/device-key"
else
    kept+=(fleetline-device-key)
fi

if ! has fleetline-release-key; then
    # ECDSA P-256, PKCS#8 PEM: the key that signs firmware releases (docs/ota.md). Boards
    # carry its public half: keep a copy outside the cluster (README.md, "Secrets").
    quiet openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 \
        -out "$work/release-key.pem"
    create fleetline-release-key --from-file=release-key.pem="$work/release-key.pem"
else
    kept+=(fleetline-release-key)
fi

if ! has fleetline-grafana; then
    put admin-password "$(random_hex 16)"
    put grafana-db-host "$db_host:$db_port"
    put grafana-db-name "$db_name"
    put grafana-db-user fleetline_grafana
    put grafana-db-password "$(random_hex 24)"
    put grafana-db-sslmode "$db_sslmode"
    create fleetline-grafana \
        --from-file=GF_SECURITY_ADMIN_PASSWORD="$work/admin-password" \
        --from-file=FLEETLINE_GRAFANA_DB_HOST="$work/grafana-db-host" \
        --from-file=FLEETLINE_GRAFANA_DB_NAME="$work/grafana-db-name" \
        --from-file=FLEETLINE_GRAFANA_DB_USER="$work/grafana-db-user" \
        --from-file=FLEETLINE_GRAFANA_DB_PASSWORD="$work/grafana-db-password" \
        --from-file=FLEETLINE_GRAFANA_DB_SSLMODE="$work/grafana-db-sslmode"
    if has fleetline-timescaledb; then
        echo "note: fleetline-grafana is new but fleetline-timescaledb was not: if the database" \
            "has started before, set fleetline_grafana's password to the new one (README.md)" >&2
    fi
else
    kept+=(fleetline-grafana)
fi

if [[ $tls == no ]]; then
    :
elif ! has fleetline-mosquitto-tls; then
    mkdir -p "$ca_dir"
    chmod 700 "$ca_dir"
    if [[ ! -f $ca_dir/ca.key ]]; then
        # ECDSA P-256: what the reference firmware verifies quickly on an ESP32.
        quiet openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
            -subj "/CN=fleetline devices CA" -keyout "$ca_dir/ca.key" -out "$ca_dir/ca.crt"
        chmod 644 "$ca_dir/ca.crt"
        ca_note="made the devices' CA in $ca_dir"
    else
        ca_note="signed with the devices' CA in $ca_dir"
    fi
    if [[ $mqtt_host =~ ^[0-9.]+$ || $mqtt_host == *:* ]]; then san="IP:$mqtt_host"; else san="DNS:$mqtt_host"; fi
    printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\n' "$san" >"$work/tls.ext"
    quiet openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -subj "/CN=$mqtt_host" -keyout "$work/tls.key" -out "$work/tls.csr"
    quiet openssl x509 -req -in "$work/tls.csr" -CA "$ca_dir/ca.crt" -CAkey "$ca_dir/ca.key" \
        -set_serial "0x$(random_hex 16)" -days 397 -extfile "$work/tls.ext" -out "$work/tls.crt"
    create fleetline-mosquitto-tls --from-file=tls.crt="$work/tls.crt" \
        --from-file=tls.key="$work/tls.key" --from-file=ca.crt="$ca_dir/ca.crt"
else
    kept+=(fleetline-mosquitto-tls)
fi

# --- Report --------------------------------------------------------------------------------
for name in ${created[@]+"${created[@]}"}; do echo "created: $name"; done
for name in ${kept[@]+"${kept[@]}"}; do echo "kept:    $name (exists)"; done
if [[ -n ${ca_note:-} ]]; then
    echo "tls:     the broker's certificate names $mqtt_host; $ca_note:"
    echo "         give devices ca.crt, keep ca.key outside the cluster (it signs the next certificate)"
fi
if [[ $in_cluster == yes ]]; then
    echo "next:    after the first deploy, grant fleetline_broker its tables (README.md, \"Deploy\")"
else
    echo "next:    on the external database, create the roles fleetline_grafana and fleetline_broker"
    echo "         with the passwords in fleetline-grafana and fleetline-mosquitto-auth (README.md)"
fi
