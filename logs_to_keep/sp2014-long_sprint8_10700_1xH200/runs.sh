# Sourced by ../device_queue/queue.sh: the record command with sprint8 over 10,700 steps, for seeds $SEEDS
# (default 0-4, in order).
LONG="--preset sprint8 --max_steps 10700 --val_every 1870 --target_val_loss 2.61 --sample_by_cluster --log_every 100
    --mask_rate 0.25 --muon_weight_decay 0.005 --normuon"
for seed in ${SEEDS:-0 1 2 3 4}; do
    run long_seed$seed python3 train.py --data data/sp2014 --tokens_per_rank 65536 $LONG --seed $seed \
        --log_dir $Q/long_seed$seed
done
