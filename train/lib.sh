# Sourced (not run) by the scripts in train/ and eval/: the check of the command line that
# comes before any work, --help, and running a child so that a signal sent to the script
# reaches it. A script sets USAGE (its arguments, after its own name; "[... flags]" at the
# end when it passes further flags on to hsd-jax), or OWN_FLAGS (the flags it takes
# itself, space-separated), and sources this file, then:
#
#   args MIN MAX "$@"   # --help, or the positionals into POS, the flags after them into EXTRA
#   path_arg OUT "${POS[1]}" out     # OUT=its absolute path; in: must be a folder,
#                                    # out: must not be a file
#   run [--log FILE] CMD ...   # CMD with SIGINT/SIGTERM/SIGHUP passed on; its exit status
#
# A script whose last step is one command `exec`s it instead, so signals reach it directly.

SCRIPT="$(basename "$(dirname "$0")")/$(basename "$0")"

# One line naming the problem and the usage, exit 2: a bad command line does nothing.
usage_error() {
  echo "$SCRIPT: $1; usage: $SCRIPT $USAGE (--help for more)" >&2
  exit 2
}

# A problem found before any work that is not the command line's shape.
die() {
  echo "$SCRIPT: $1" >&2
  exit 2
}

# args MIN MAX "$@": -h or --help anywhere prints the usage and the script's header comment
# (exit 0). The leading arguments that do not start with "-", MIN to MAX of them, go into
# POS; what follows goes into EXTRA: flags of OWN_FLAGS, or, where USAGE ends in "flags]",
# anything that starts with a flag. The rest is refused by usage_error.
args() {
  local min=$1 max=$2 a names
  shift 2
  for a in "$@"; do
    case "$a" in -h|--help)
      echo "usage: $SCRIPT $USAGE"
      echo
      sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"  # the comment block under the #! line
      exit 0 ;;
    esac
  done
  read -ra names <<< "$USAGE"
  POS=()
  while [ $# -gt 0 ] && [ ${#POS[@]} -lt "$max" ]; do
    case "$1" in
      -*) break ;;
      "") usage_error "${names[${#POS[@]}]} is an empty string" ;;
    esac
    POS+=("$1")
    shift
  done
  if [ ${#POS[@]} -lt "$min" ]; then
    [ $# -eq 0 ] || usage_error "unknown option '$1' where ${names[${#POS[@]}]} is expected"
    usage_error "${names[${#POS[@]}]} is missing"
  fi
  EXTRA=("$@")
  for a in "$@"; do
    [[ " ${OWN_FLAGS:-} " != *" $a "* ]] || continue
    case "$a" in
      -*) [ -z "${OWN_FLAGS:-}" ] && [[ "$USAGE" == *"flags]" ]] || usage_error "unknown option '$a'" ;;
      *) usage_error "one argument too many: '$a'" ;;
    esac
    break  # the first flag passed on: the rest are hsd-jax's to check
  done
}

# path_arg VAR VALUE in|out: VAR=VALUE's absolute path (scripts cd to the repository root,
# so a relative path is resolved first); an input (a model, results) must be an existing
# folder, an output folder must not be a file.
path_arg() {
  local path
  path="$(realpath -m -- "$2")"
  case "$3" in
    in) [ -e "$path" ] || die "$2 does not exist (as $path); give a folder" ;;&
    *) [ ! -e "$path" ] || [ -d "$path" ] || die "$2 is a file; give a folder" ;;
  esac
  printf -v "$1" '%s' "$path"
}

# Says in one line when a command the script runs is not installed.
need() {
  command -v "$1" > /dev/null \
    || die "'$1' is not on PATH; activate the project's virtualenv (source .venv/bin/activate) or pip install -e . first"
}

# run [--log FILE] CMD ...: runs CMD (its output appended to FILE) and returns its exit
# status. CMD runs in the background, in its own process group (set -m), and this script
# waits for it: SIGINT and SIGTERM sent to the script are passed on, SIGHUP as SIGTERM
# (hsd-jax saves its work on SIGTERM; SIGHUP would end it outright), and a terminal's
# Ctrl-C, which reaches the script's group, reaches CMD once, through this. After a signal
# the script ends when CMD has, with CMD's status.
run() {
  local status log=""
  if [ "$1" = --log ]; then log=$2; shift 2; fi
  _child="" _pending="" _got="" _sent=""
  trap '_pass_on INT INT' INT
  trap '_pass_on TERM TERM' TERM
  trap '_pass_on HUP TERM' HUP
  set -m
  if [ -n "$log" ]; then "$@" >> "$log" 2>&1 & else "$@" & fi
  _child=$!
  set +m
  if [ -n "$_pending" ]; then kill -s "$_pending" "$_child" 2> /dev/null || true; fi
  while kill -0 "$_child" 2> /dev/null; do
    wait "$_child" 2> /dev/null || true  # returns early when a signal's trap runs
  done
  wait "$_child" && status=0 || status=$?  # bash keeps an ended child's status for this
  trap - INT TERM HUP
  if [ -n "$_got" ]; then
    [ "$status" != 0 ] || status=$((128 + $(kill -l "$_got")))
    echo "$SCRIPT: SIG$_got passed on to $1$([ "$_got" = "$_sent" ] || echo " as SIG$_sent"), which stopped (exit status $status); the same command continues where it stopped" >&2
    exit "$status"
  fi
  return "$status"
}

# The trap of run: $1 the signal received, $2 the one passed on.
_pass_on() {
  _got=$1 _sent=$2
  if [ -n "$_child" ]; then kill -s "$2" "$_child" 2> /dev/null || true; else _pending=$2; fi
}
