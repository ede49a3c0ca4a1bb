;; The lookup kernel of a sealed version whose rows live in WebAssembly memory (see
;; src/shard/wasm-kernel.ts, which holds this module compiled; `npm run build:kernel` regenerates it).
;;
;; lookup(keys, n, slots, cap, rows, rowBytes, out, found, blk) -> hits
;;   keys:  n packed keys (lo, hi uint32 pairs)          slots: cap slots of 3 uint32 (lo, hi, row + 1; 0 = empty)
;;   rows:  row r at rows + r * rowBytes                   out:   n rows written, absent ones zeroed
;;   found: n bytes, 1 or 0                                blk:   64 bytes of scratch (16 rows)
;; The probe is VersionData's: slotHash, scaled to the slot count in doubles, linear probing. Blocks of 16 keys:
;; find and touch the rows of the whole block first, then copy them 16 bytes at a time, so the CPU
;; overlaps the cache misses. rowBytes is a multiple of 16.
(module
  (import "env" "memory" (memory 1))
  (func (export "lookup") (param $keys i32) (param $n i32) (param $slots i32) (param $cap i32) (param $rows i32) (param $rb i32)
        (param $out i32) (param $found i32) (param $blk i32) (result i32)
    (local $base i32) (local $end i32) (local $i i32) (local $lo i32) (local $hi i32) (local $h i32) (local $s i32)
    (local $p i32) (local $r i32) (local $hits i32) (local $src i32) (local $dst i32) (local $k i32) (local $touch i32) (local $off i32)
    (block $done
      (loop $blocks
        (br_if $done (i32.ge_u (local.get $base) (local.get $n)))
        (local.set $end (i32.add (local.get $base) (i32.const 16)))
        (if (i32.gt_u (local.get $end) (local.get $n)) (then (local.set $end (local.get $n))))
        (local.set $i (local.get $base))
        (block $p1done (loop $p1
          (br_if $p1done (i32.ge_u (local.get $i) (local.get $end)))
          (local.set $p (i32.add (local.get $keys) (i32.shl (local.get $i) (i32.const 3))))
          (local.set $lo (i32.load (local.get $p)))
          (local.set $hi (i32.load offset=4 (local.get $p)))
          (local.set $h (i32.xor (i32.mul (local.get $lo) (i32.const 0x9e3779b1))
                                 (i32.mul (i32.xor (local.get $hi) (i32.const 0x7f4a7c15)) (i32.const 0x85ebca77))))
          (local.set $h (i32.xor (local.get $h) (i32.shr_u (local.get $h) (i32.const 15))))
          (local.set $h (i32.mul (local.get $h) (i32.const 0x2c1b3c6d)))
          (local.set $h (i32.xor (local.get $h) (i32.shr_u (local.get $h) (i32.const 12))))
          ;; homeSlot(): h * cap * 2^-32 in doubles, as JavaScript computes it (the product rounds
          ;; once past 2^53, so an exact integer multiply could start a probe one slot early).
          (local.set $s (i32.trunc_f64_u (f64.mul (f64.mul (f64.convert_i32_u (local.get $h)) (f64.convert_i32_u (local.get $cap)))
                                                  (f64.const 0x1p-32))))
          (local.set $r (i32.const -1))
          (block $hit (loop $probe
            (local.set $p (i32.add (local.get $slots) (i32.mul (local.get $s) (i32.const 12))))
            (local.set $k (i32.load offset=8 (local.get $p)))
            (br_if $hit (i32.eqz (local.get $k)))
            (if (i32.and (i32.eq (i32.load (local.get $p)) (local.get $lo)) (i32.eq (i32.load offset=4 (local.get $p)) (local.get $hi)))
              (then (local.set $r (i32.sub (local.get $k) (i32.const 1))) (br $hit)))
            (local.set $s (i32.add (local.get $s) (i32.const 1)))
            (if (i32.eq (local.get $s) (local.get $cap)) (then (local.set $s (i32.const 0))))
            (br $probe)))
          (i32.store (i32.add (local.get $blk) (i32.shl (i32.sub (local.get $i) (local.get $base)) (i32.const 2))) (local.get $r))
          (if (i32.ge_s (local.get $r) (i32.const 0)) (then
            (local.set $touch (i32.add (local.get $touch) (i32.load8_u (i32.add (local.get $rows) (i32.mul (local.get $r) (local.get $rb))))))))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br $p1)))
        (local.set $i (local.get $base))
        (block $p2done (loop $p2
          (br_if $p2done (i32.ge_u (local.get $i) (local.get $end)))
          (local.set $r (i32.load (i32.add (local.get $blk) (i32.shl (i32.sub (local.get $i) (local.get $base)) (i32.const 2)))))
          (local.set $dst (i32.add (local.get $out) (i32.mul (local.get $i) (local.get $rb))))
          (local.set $off (i32.const 0))
          (if (i32.lt_s (local.get $r) (i32.const 0))
            (then
              (i32.store8 (i32.add (local.get $found) (local.get $i)) (i32.const 0))
              (block $zd (loop $z
                (br_if $zd (i32.ge_u (local.get $off) (local.get $rb)))
                (v128.store (i32.add (local.get $dst) (local.get $off)) (v128.const i64x2 0 0))
                (local.set $off (i32.add (local.get $off) (i32.const 16)))
                (br $z))))
            (else
              (local.set $src (i32.add (local.get $rows) (i32.mul (local.get $r) (local.get $rb))))
              (block $cd (loop $c
                (br_if $cd (i32.ge_u (local.get $off) (local.get $rb)))
                (v128.store (i32.add (local.get $dst) (local.get $off)) (v128.load (i32.add (local.get $src) (local.get $off))))
                (local.set $off (i32.add (local.get $off) (i32.const 16)))
                (br $c)))
              (i32.store8 (i32.add (local.get $found) (local.get $i)) (i32.const 1))
              (local.set $hits (i32.add (local.get $hits) (i32.const 1)))))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br $p2)))
        (local.set $base (local.get $end))
        (br $blocks)))
    (i32.store (local.get $blk) (local.get $touch))
    (local.get $hits)))
