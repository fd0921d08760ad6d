#!/usr/bin/env bash
# Broken site configurations: `check-config` exits 2 and names the JSON path
# of the mistake on stderr; `run` with a broken config exits 2 without
# creating anything (no data_dir, no backing file, no socket).
source "$(dirname "$0")/lib.sh"
br_init "$@"
cd "$BR_TMP" || die "cd $BR_TMP"

# A valid base config with relative paths (relative to the config file).
# The port is free now; nothing here should ever listen on it.
PORT=$(br_free_port)
BASE='{
  "site": "t",
  "data_dir": "state",
  "control_socket": "state/control.sock",
  "nbd": { "unix_socket": "state/nbd.sock", "listen": "127.0.0.1:'"$PORT"'" },
  "groups": [ { "name": "g", "role": "primary",
                "volumes": [ { "name": "v", "path": "v.img", "size": "16MiB" } ] } ]
}'
mkdir -p cfg
echo "$BASE" >cfg/ok.json
expect_rc 0 "check-config accepts the base config" "$BR_BIN" check-config cfg/ok.json
assert_true "check-config created no files" test ! -e cfg/state -a ! -e cfg/v.img

# bad NAME JQ-FILTER PATH-IN-MESSAGE: derive a broken config from BASE.
N=0
bad() {
  local name=$1 filter=$2 path=$3 file
  N=$((N + 1))
  file=cfg/bad$N.json
  jq "$filter" <<<"$BASE" >"$file" || die "jq filter for '$name' failed"
  expect_bad "$name" "$file" "$path"
}
expect_bad() {
  local name=$1 file=$2 path=$3
  "$BR_BIN" check-config "$file" >"$BR_TMP/out" 2>"$BR_TMP/err" </dev/null
  local rc=$?
  if [ "$rc" = 2 ] && grep -qF -- "$path" "$BR_TMP/err"; then
    pass "$name: exit 2, names '$path'"
  else
    fail "$name: expected exit 2 and '$path' on stderr; got exit $rc"
    sed 's/^/   | stderr: /' "$BR_TMP/err" | head -n 5
    sed 's/^/   | stdout: /' "$BR_TMP/out" | head -n 5
  fi
}

bad "unknown top-level key"      '.bogus = 1'                                     'bogus'
bad "unknown volume key"         '.groups[0].volumes[0].colour = "red"'           'groups[0].volumes[0].colour'
bad "site of the wrong type"     '.site = 5'                                      'site'
bad "groups of the wrong type"   '.groups = "g"'                                  'groups'
bad "missing groups"             'del(.groups)'                                   'groups'
bad "bad size string"            '.groups[0].volumes[0].size = "12XB"'            'groups[0].volumes[0].size'
bad "negative size"              '.groups[0].volumes[0].size = -5'                'groups[0].volumes[0].size'
bad "duplicate volume name"      '.groups[0].volumes += [{name: "v", path: "w.img", size: "1MiB"}]' 'groups[0].volumes[1].name'
bad "duplicate group name"       '.groups += [.groups[0] | .volumes[0].name = "w" | .volumes[0].path = "w.img"]' 'groups[1].name'
bad "missing backing path"       'del(.groups[0].volumes[0].path)'                'groups[0].volumes[0].path'
bad "empty volume name"          '.groups[0].volumes[0].name = ""'                'groups[0].volumes[0].name'
bad "bad role"                   '.groups[0].role = "boss"'                       'groups[0].role'
bad "region_size out of range"   '.groups[0].region_size = "1KiB"'                'groups[0].region_size'
bad "bad nbd.listen"             '.nbd.listen = "nohost"'                         'nbd.listen'
bad "nbd.listen port 0"          '.nbd.listen = "127.0.0.1:0"'                    'nbd.listen'
bad "bad downstream mode"        '.groups[0].downstream = [{site: "b", address: "127.0.0.1:1", mode: "fast"}]' 'groups[0].downstream[0].mode'
bad "bad max_queue"              '.groups[0].downstream = [{site: "b", address: "127.0.0.1:1", mode: "async", max_queue: "lots"}]' 'groups[0].downstream[0].max_queue'
bad "secondary without upstream" '.replication = {listen: "127.0.0.1:1"} | .groups[0].role = "secondary"' 'groups[0].upstream'

# Environment mistakes found before anything is opened.
truncate -s 1M cfg/small.img
bad "backing file of another size" '.groups[0].volumes[0].path = "small.img"'    'groups[0].volumes[0]'
touch cfg/afile
bad "data_dir under a regular file" '.data_dir = "afile/sub"'                   'data_dir'

# Not JSON at all, and a file that does not exist.
printf '{"site": "t",' >cfg/syntax.json
expect_rc 2 "JSON syntax error: exit 2" "$BR_BIN" check-config cfg/syntax.json
assert_contains "syntax error names the file" "syntax.json" "$BR_OUT"
expect_rc 2 "missing config file: exit 2" "$BR_BIN" check-config cfg/does-not-exist.json
expect_rc 2 "check-config without a file: usage error" "$BR_BIN" check-config

# `run` with broken configs: exit 2 and no files created. The configs name
# data_dir, sockets and backing files inside a fresh directory each time.
run_bad() {
  local name=$1 filter=$2 dir
  dir=$(mktemp -d "$BR_TMP/run.XXXXXX")
  jq "$filter" <<<"$BASE" >"$dir/site.json"
  timeout 20 "$BR_BIN" run --config "$dir/site.json" >"$dir/out" 2>"$dir/err" </dev/null
  local rc=$?
  local created
  created=$(cd "$dir" && find . -mindepth 1 ! -name site.json ! -name out ! -name err ! -name small.img | sort)
  if [ "$rc" = 2 ] && [ -z "$created" ]; then
    pass "run with $name: exit 2, nothing created"
  else
    fail "run with $name: expected exit 2 and no new files; got exit $rc, created: ${created:-nothing}"
    sed 's/^/   | stderr: /' "$dir/err" | head -n 5
  fi
}
run_bad "an unknown key in the last volume" '.groups[0].volumes[0].extra = true'
run_bad "a duplicate volume" '.groups[0].volumes += [{name: "v", path: "w.img", size: "1MiB"}]'
run_bad "a bad size" '.groups[0].volumes[0].size = "lots"'
run_bad "a bad listen address" '.nbd.listen = "127.0.0.1:notaport"'
# The size mismatch is found by looking at the file, which must stay as it was.
dir=$(mktemp -d "$BR_TMP/run.XXXXXX")
truncate -s 1M "$dir/small.img"
jq '.groups[0].volumes[0].path = "small.img"' <<<"$BASE" >"$dir/site.json"
expect_rc 2 "run with a backing file of another size: exit 2" "$BR_BIN" run --config "$dir/site.json"
assert_eq "the backing file keeps its size" 1048576 "$(stat -c %s "$dir/small.img")"
assert_true "no data_dir created" test ! -e "$dir/state"

br_finish
