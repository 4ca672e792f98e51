# A Ray head on this machine for `ray job submit` (README: Running on a cluster, "On one machine").
#   source scripts/ray_local.sh          # start the head (or find the one running); exports
#                                        #   RAY_API_SERVER_ADDRESS and RAY_AUTH_MODE=token for `ray job ...`
#   bash scripts/ray_local.sh stop       # stop that head: its own processes only, never `ray stop`
# What a plain `ray start --head` gets wrong for the jobs:
# - auth: a Ray started by the project (the demo) leaves ~/.ray/auth_token, and `ray start` then
#   turns token auth on, but the `ray` CLI sends the token only with RAY_AUTH_MODE=token;
# - size: on 2 cores the head has 2 CPUs, and the demo's synthesis (vLLM engine actor, its
#   chat-template actor, the driver's tasks) waits forever for one. The head declares
#   max(4, cores) logical CPUs, as `ray.num_cpus` does for a local run (CM_RAY_NUM_CPUS overrides).
# Its environment is the demo's (scripts/demo.sh): one OpenMP thread per worker, the compiled
# DeepSpeed ops cache, offline hub. State and log: ${CM_RAY_LOCAL_DIR:-~/.cache/cm_ray/ray_local}.

_cmr_venv="${CM_RAY_VENV:-$HOME/.cache/cm_ray/venv}"
_cmr_dir="${CM_RAY_LOCAL_DIR:-$HOME/.cache/cm_ray/ray_local}"

_cmr_alive() {  # the head recorded in head.pid is running
    [ -f "$_cmr_dir/head.pid" ] && kill -0 "$(cat "$_cmr_dir/head.pid")" 2>/dev/null
}

_cmr_start() {
    local py="$_cmr_venv/bin/python" ray="$_cmr_venv/bin/ray"
    if [ ! -x "$ray" ]; then
        echo "ray_local: no Ray in $_cmr_venv (run bash scripts/install.sh, or set CM_RAY_VENV)" >&2
        return 1
    fi
    mkdir -p "$_cmr_dir"
    if ! _cmr_alive; then
        local ports cpus
        # Ray's default ports when free (GCS 6379, dashboard 8265, dashboard agent 52365, Ray
        # client 10001), else free ones: another Ray on this machine keeps its own.
        ports="$("$py" - <<'EOF'
import socket
def port(want):
    for p in (want, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                continue
            return s.getsockname()[1]
print(port(6379), port(8265), port(52365), port(10001))
EOF
)" || return 1
        cpus="${CM_RAY_NUM_CPUS:-$(( $(nproc) > 4 ? $(nproc) : 4 ))}"
        if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -z "${RAY_AUTH_TOKEN_PATH:-}" ]; then
            RAY_AUTH_MODE=token "$ray" get-auth-token --generate >/dev/null || return 1  # kept if present
        fi
        set -- $ports
        # Its own session and temp dir: stopped by process group, and a plain ray.init() elsewhere
        # on this machine does not join it (Ray finds clusters through its default temp dir).
        env RAY_AUTH_MODE=token OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" \
            TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/cm_ray/torch_extensions}" \
            "$py" -c 'import subprocess, sys
log = open(sys.argv[1], "w")
print(subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                       start_new_session=True).pid)' "$_cmr_dir/head.log" \
            "$ray" start --head --block --node-ip-address=127.0.0.1 --port="$1" \
            --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$2" \
            --dashboard-agent-listen-port="$3" --ray-client-server-port="$4" \
            --num-cpus="$cpus" --temp-dir="/tmp/cm-ray-local-$(id -u)" --disable-usage-stats \
            > "$_cmr_dir/head.pid" || return 1
        echo "http://127.0.0.1:$2" > "$_cmr_dir/address"
        local waited=0
        until RAY_AUTH_MODE=token RAY_API_SERVER_ADDRESS="$(cat "$_cmr_dir/address")" \
                "$ray" job list >/dev/null 2>&1; do
            if ! _cmr_alive || [ "$waited" -ge 180 ]; then
                echo "ray_local: the head did not come up (log: $_cmr_dir/head.log):" >&2
                tail -n 20 "$_cmr_dir/head.log" >&2
                _cmr_stop
                return 1
            fi
            sleep 2
            waited=$((waited + 2))
        done
        echo "ray_local: head up with $cpus CPUs, jobs API at $(cat "$_cmr_dir/address") (log: $_cmr_dir/head.log)" >&2
    fi
    export RAY_API_SERVER_ADDRESS="$(cat "$_cmr_dir/address")" RAY_AUTH_MODE=token
}

_cmr_stop() {
    if _cmr_alive; then
        local pgid waited=0
        pgid="$(cat "$_cmr_dir/head.pid")"
        kill -TERM -- "-$pgid" 2>/dev/null
        while kill -0 -- "-$pgid" 2>/dev/null && [ "$waited" -lt 60 ]; do
            sleep 1
            waited=$((waited + 1))
        done
        kill -KILL -- "-$pgid" 2>/dev/null
        echo "ray_local: head stopped" >&2
    fi
    rm -f "$_cmr_dir/head.pid" "$_cmr_dir/address"
    if [ "${RAY_API_SERVER_ADDRESS:-}" != "" ]; then unset RAY_API_SERVER_ADDRESS; fi
}

if (return 0 2>/dev/null); then  # sourced: start, and leave the variables in the caller's shell
    _cmr_start
else
    case "${1:-start}" in
        start) _cmr_start || exit 1
               echo "export RAY_API_SERVER_ADDRESS=$RAY_API_SERVER_ADDRESS RAY_AUTH_MODE=token" ;;
        stop) _cmr_stop ;;
        *) echo "usage: source scripts/ray_local.sh | bash scripts/ray_local.sh [start|stop]" >&2; exit 2 ;;
    esac
fi
