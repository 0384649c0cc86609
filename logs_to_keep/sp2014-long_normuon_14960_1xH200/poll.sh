#!/usr/bin/env bash
# Wait up to $1 s for the queue (/tmp/q/done), or for a line of /tmp/q/queue.txt matching $2, checking each 10 s and
# printing progress each minute; then tar /tmp/q into $OUT/q.tgz.
[ -d /tmp/q ] || { echo "no /tmp/q: this machine is new, start the queue again"; exit 0; }  # before any waiting
END=$(( $(date +%s) + ${1:-500} )); N=0
until [ $(date +%s) -ge $END ] || [ -f /tmp/q/done ] || { [ -n "${2:-}" ] && grep -q "$2" /tmp/q/queue.txt 2>/dev/null; }; do
    sleep 10; N=$((N + 1))
    if [ $((N % 6)) -eq 0 ]; then
        echo "$(date +%T) $(tail -1 /tmp/q/queue.txt 2>/dev/null | cut -c1-100)"
        for f in /tmp/q/*.out; do [ -f "$f" ] && echo "  $f: $(grep -E '^step' "$f" | tail -1 | cut -c1-110)"; done
    fi
done
grep -v "^ " /tmp/q/queue.txt | tail -12
tar czf "$OUT/q.tgz" -C /tmp q && ls -la "$OUT"
