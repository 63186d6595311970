# shellcheck shell=bash
# Helpers the launch scripts source (not run on its own): printing commands for --dry-run.

# One word as a shell reads it back: bare when that is safe, else single-quoted (easier to read than %q).
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# The command "$@" as one line that a shell runs exactly as given.
command_line() {
  local words=() word
  for word in "$@"; do words+=("$(quote "$word")"); done
  echo "${words[*]}"
}
