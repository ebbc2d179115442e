#!/usr/bin/env bash
# The decoder in tract, split (per frame / per prompt / masks) against the one graph: MACs per
# prompt, per-prompt time by batch size, the per-op profiles behind docs/performance.md, and one
# segment-everything run. Writes benches/decoder-results.md (committed) with the commands.
#
#   bash benches/decoder.sh
#
# Uses the committed default model; onnxruntime side by side is benches/compare.py's job.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bins
BIN=./target/release/tinysam
MODEL=models/default
IMAGE=tests/fixtures/golden/frame.png
[ -f ../shared/images/tinysam-picture2.jpg ] && IMAGE=../shared/images/tinysam-picture2.jpg
OUT=benches/decoder-results.md

# run "COMMAND ...": the command as a heading line, then its output (stderr too) in a code block.
run() {
    echo "\`$*\`"
    echo
    echo '```'
    RUST_LOG=warn "$@" 2>&1
    echo '```'
    echo
}

{
    echo "# Decoder results"
    echo
    echo "Made by \`bash benches/decoder.sh\` on $(date -u +%Y-%m-%d) (git $(git rev-parse --short HEAD)),"
    echo "model \`$MODEL\` (synthetic weights), image \`$IMAGE\`, 2 threads unless said."
    echo
    echo "## MACs per one-point prompt (per-frame part excluded)"
    echo
    for form in auto one-graph; do
        run "$BIN" info --model "$MODEL" --decoder-graph "$form"
    done
    echo "## Per-prompt time by batch size (split form)"
    echo
    echo "Batches run one prompt per thread at a time, each prompt single-threaded; a single prompt"
    echo "runs on all threads. At 2 threads, then at 1."
    echo
    for threads in 2 1; do
        run "$BIN" bench --model "$MODEL" --image "$IMAGE" --precisions fp32 \
            --batches 1,2,4,8,16,64 --runs 3 --threads "$threads"
    done
    echo "## Profiles of one decoder batch"
    echo
    echo "The one graph at batch 16 (before), the split form at 16 (the profile runs the batch as one"
    echo "plan run on both threads, not as the decoder does) and at 1; nodes named masks:... are the"
    echo "mask graph's."
    echo
    run "$BIN" bench --model "$MODEL" --image "$IMAGE" --precisions fp32 --batches 16 --runs 1 \
        --threads 2 --profile --decoder-graph one-graph
    run "$BIN" bench --model "$MODEL" --image "$IMAGE" --precisions fp32 --batches 16 --runs 1 \
        --threads 2 --profile
    run "$BIN" bench --model "$MODEL" --image "$IMAGE" --precisions fp32 --batches 1 --runs 1 \
        --threads 2 --profile
    echo "## Our fused decoder ops against tract's nodes"
    echo
    echo "The per-prompt graph with tract's nodes and with TinysamImageToTokenOutput or"
    echo "TinysamTokenToImageAttention, the mask graph with tract's nodes and as TinysamMaskUpscaling"
    echo "(same inputs, best of 8), at batch 1 and 4; the token->image op alone at 1 and 2 threads."
    echo
    run cargo test --release --locked --quiet --lib -- token_mixing_speed token_to_image_speed \
        token_to_image_op_speed upscaling_speed --ignored --nocapture --test-threads 1
    echo "## Segment everything (hierarchical, encoder INT8, decoder split)"
    echo
    run "$BIN" segment "$IMAGE" --everything --model "$MODEL" --out target/decoder-bench/everything
} >"$OUT"
echo "wrote $OUT"
