#!/usr/bin/env bash
# iBOT launcher with the official convention:
#
#   ./run.sh TYPE JOB_NAME ARCH KEY GPUS [extra args...]
#
# TYPE      one or several task names, matched as substrings (e.g. imagenet_pretrain+imagenet_knn)
# JOB_NAME  output folder name: $OUTPUT_DIR defaults to work_dirs/JOB_NAME
# ARCH      backbone (--arch), e.g. vit_small, swin_tiny
# KEY       comma-separated checkpoint keys evaluated by eval tasks (teacher, student)
# GPUS      total GPUs; 0 runs one process on the CPU
#
# Environment (official names): MAX_GPUS (8), GPUS_PER_NODE, OUTPUT_DIR, PRETRAINED
# ($OUTPUT_DIR/checkpoint.pth), TOTAL_NODES (1), NODE_ID (0), MASTER_ADDR (127.0.0.1), MASTER_PORT
# (29500), AVGPOOL / LINEAR_AVGPOOL / LINEAR_N_LAST_BLOCKS, WEIGHT_FILE, PYTHON (.venv/bin/python if
# tools/setup_env.sh made it, else python3), TORCHRUN (the launcher command).
# Launches use torchrun (never torch.distributed.launch). With TOTAL_NODES > 1, pre-training and
# fine-tuning span the nodes (--nnodes/--node_rank); per-key evaluations are shared out, key K to node
# K mod TOTAL_NODES, and each node runs its own alone on a local rendezvous (official).
# Extra args go to pre-training, and to the evaluation tasks only when TYPE contains no pre-training
# (official rule); EVAL_ARGS is appended to every evaluation command (this repository's addition).
set -euo pipefail

if [ $# -lt 5 ]; then
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi

cd "$(dirname "$0")"
CURDIR=$(pwd)
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$CURDIR"
echo "The work dir is: $CURDIR"

TYPE=$1; JOB_NAME=$2; ARCH=$3; KEY=$4; GPUS=$5
EXTRA=("${@:6}")
if [ -z "${PYTHON:-}" ]; then if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi; fi
MAX_GPUS=${MAX_GPUS:-8}
# the launcher: $TORCHRUN if set, else torchrun beside $PYTHON or on PATH, else $PYTHON -m torch.distributed.run
if [ -n "${TORCHRUN:-}" ]; then read -r -a TORCHRUN <<< "$TORCHRUN"
elif [ -x "$(dirname "$PYTHON")/torchrun" ] && [ "$PYTHON" != python3 ]; then TORCHRUN=("$(dirname "$PYTHON")/torchrun")
elif command -v torchrun >/dev/null 2>&1; then TORCHRUN=(torchrun)
else TORCHRUN=("$PYTHON" -m torch.distributed.run); fi
if [ "$GPUS" -lt "$MAX_GPUS" ]; then GPUS_PER_NODE=${GPUS_PER_NODE:-$GPUS}; else GPUS_PER_NODE=${GPUS_PER_NODE:-$MAX_GPUS}; fi
OUTPUT_DIR=${OUTPUT_DIR:-$CURDIR/work_dirs/$JOB_NAME}
PRETRAINED=${PRETRAINED:-$OUTPUT_DIR/checkpoint.pth}
TOTAL_NODES=${TOTAL_NODES:-1}
NODE_ID=${NODE_ID:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
read -r -a EVAL_EXTRA <<< "${EVAL_ARGS:-}"
IFS=',' read -r -a KEY_LIST <<< "$KEY"

# feature defaults of the frozen protocols (official: only when none of the three is set)
if [ -z "${AVGPOOL:-}" ] && [ -z "${LINEAR_AVGPOOL:-}" ] && [ -z "${LINEAR_N_LAST_BLOCKS:-}" ]; then
    if [[ $ARCH =~ small ]] || [[ $ARCH =~ swin ]]; then AVGPOOL=0; LINEAR_AVGPOOL=0; LINEAR_N_LAST_BLOCKS=4
    else AVGPOOL=0; LINEAR_AVGPOOL=2; LINEAR_N_LAST_BLOCKS=1; fi
fi
AVGPOOL=${AVGPOOL:-0}; LINEAR_AVGPOOL=${LINEAR_AVGPOOL:-0}; LINEAR_N_LAST_BLOCKS=${LINEAR_N_LAST_BLOCKS:-4}

# launch PORT SCRIPT ARGS...: a job that spans the nodes (pre-training, fine-tuning): torchrun with
# --nnodes $TOTAL_NODES --node_rank $NODE_ID on GPUs, one plain process on the CPU when GPUS=0
launch() {
    local port=$1; shift
    if [ "$GPUS" -eq 0 ]; then
        "$PYTHON" "$@"
    else
        "${TORCHRUN[@]}" --nnodes "$TOTAL_NODES" --node_rank "$NODE_ID" \
            --nproc_per_node "$GPUS_PER_NODE" --master_addr "$MASTER_ADDR" --master_port "$port" "$@"
    fi
}

# launch_local PORT SCRIPT ARGS...: a per-key evaluation, which this node runs alone (official): its own
# single-node rendezvous on this machine, whatever TOTAL_NODES says
launch_local() {
    local port=$1; shift
    if [ "$GPUS" -eq 0 ]; then
        "$PYTHON" "$@"
    else
        "${TORCHRUN[@]}" --nnodes 1 --node_rank 0 \
            --nproc_per_node "$GPUS_PER_NODE" --master_addr 127.0.0.1 --master_port "$port" "$@"
    fi
}

# extras for evaluation tasks: forwarded only when this TYPE does not pre-train (official rule)
eval_extras() {
    if [[ $TYPE =~ pretrain ]] || [[ $TYPE =~ fmnist_demo ]]; then echo "${EVAL_EXTRA[@]}"; else echo "${EXTRA[@]} ${EVAL_EXTRA[@]}"; fi
}
CPU_KNN=()
if [ "$GPUS" -eq 0 ]; then CPU_KNN=(--use_cuda false); fi

if [[ $TYPE =~ pretrain ]]; then
    echo "==> Pre-training $ARCH into $OUTPUT_DIR"
    mkdir -p "$OUTPUT_DIR"
    launch "$MASTER_PORT" main_ibot.py --arch "$ARCH" --output_dir "$OUTPUT_DIR" \
        --data_path data/imagenet/train "${EXTRA[@]}"
fi

if [[ $TYPE =~ fmnist_demo ]]; then
    # small-image recipe on 32-px Fashion-MNIST with a per-epoch k-NN (logic in ibot/demo.py)
    DEMO_DATA=${DEMO_DATA:-data/fmnist32}
    echo "==> Fashion-MNIST demo: pre-training $ARCH into $OUTPUT_DIR"
    "$PYTHON" -m ibot.demo prepare --data "$DEMO_DATA" --output_dir "$OUTPUT_DIR"
    read -r -a DEMO_FLAGS <<< "$("$PYTHON" -m ibot.demo flags --data "$DEMO_DATA")"
    launch "$MASTER_PORT" main_ibot.py --arch "$ARCH" --output_dir "$OUTPUT_DIR" "${DEMO_FLAGS[@]}" "${EXTRA[@]}"
    "$PYTHON" -m ibot.demo report --data "$DEMO_DATA" --output_dir "$OUTPUT_DIR"
fi

# fine-tuning jobs span the nodes: every node takes part in each key's run (launch)
for K in "${!KEY_LIST[@]}"; do
    KEY_NAME=${KEY_LIST[$K]}
    PORT=$(( MASTER_PORT - K ))
    read -r -a EX <<< "$(eval_extras)"

    if [[ $TYPE =~ imagenet_cls ]] && ! [[ $TYPE =~ pretrain ]]; then
        echo "==> ImageNet fine-tuning of $KEY_NAME"
        WEIGHT_FILE=$OUTPUT_DIR/cls/imnet/checkpoint_$KEY_NAME.pth
        mkdir -p "$OUTPUT_DIR/cls/imnet"
        "$PYTHON" evaluation/classification_layer_decay/extract_backbone_weights.py "$PRETRAINED" "$WEIGHT_FILE" \
            --checkpoint_key "$KEY_NAME"
        launch "$PORT" evaluation/classification_layer_decay/run_class_finetuning.py --finetune "$WEIGHT_FILE" \
            --model "$ARCH" --epochs 100 --warmup_epochs 20 --layer_decay 0.65 --mixup 0.8 --cutmix 1.0 \
            --layer_scale_init_value 0.0 --disable_rel_pos_bias --abs_pos_emb --use_cls \
            --imagenet_default_mean_and_std --output_dir "$OUTPUT_DIR/cls/imnet" --data_path data/imagenet "${EX[@]}"
    fi
    if [[ $TYPE =~ imagenet_semi_cls ]] && ! [[ $TYPE =~ pretrain ]]; then
        echo "==> semi-supervised fine-tuning of $KEY_NAME"
        launch "$PORT" evaluation/semi_supervised/eval_cls.py --pretrained_weights "$PRETRAINED" \
            --avgpool_patchtokens "$AVGPOOL" --arch "$ARCH" --checkpoint_key "$KEY_NAME" \
            --output_dir "$OUTPUT_DIR/semi_cls" --data_path data/imagenet_split "${EX[@]}"
    fi
    for DS in cifar10 cifar cars flwrs inat19 inat; do
        if [[ $TYPE =~ ${DS}_cls ]] && ! [[ $TYPE =~ pretrain ]]; then
            case $DS in
                cifar10) SET=(--lr 7.5e-6 --epochs 1000 --data_set CIFAR10 --data_path data/cifar) ;;
                cifar)   SET=(--lr 7.5e-6 --epochs 1000 --data_set CIFAR --data_path data/cifar) ;;
                cars)    SET=(--lr 7.5e-5 --epochs 1000 --data_set Cars --data_path data/cars) ;;
                flwrs)   SET=(--lr 7.5e-6 --epochs 1000 --data_set Flwrs --data_path data/flwrs) ;;
                inat19)  SET=(--lr 7.5e-6 --epochs 360 --reprob 0.1 --data_set INAT19 --data_path data/inat/2019) ;;
                inat)    SET=(--lr 7.5e-6 --epochs 360 --reprob 0.1 --data_set INAT --data_path data/inat/2018) ;;
            esac
            echo "==> transfer fine-tuning on $DS of $KEY_NAME"
            launch "$PORT" evaluation/eval_cls.py --pretrained_weights "$PRETRAINED" --avgpool_patchtokens "$AVGPOOL" \
                --arch "$ARCH" --checkpoint_key "$KEY_NAME" --output_dir "$OUTPUT_DIR/cls/$DS" --batch-size 96 \
                "${SET[@]}" "${EX[@]}"
        fi
    done
done

# per-key evaluations: TOTAL_NODES nodes share the keys, each node evaluates its own alone (launch_local)
for K in "${!KEY_LIST[@]}"; do
    if [ $(( K % TOTAL_NODES )) -ne "$NODE_ID" ]; then continue; fi
    KEY_NAME=${KEY_LIST[$K]}
    PORT=$(( MASTER_PORT - K ))
    read -r -a EX <<< "$(eval_extras)"

    if [[ $TYPE =~ imagenet_knn ]]; then
        echo "==> k-NN of $KEY_NAME"
        launch_local "$PORT" evaluation/eval_knn.py --pretrained_weights "$PRETRAINED" --avgpool_patchtokens "$AVGPOOL" \
            --arch "$ARCH" --checkpoint_key "$KEY_NAME" --data_path data/imagenet "${CPU_KNN[@]}" "${EX[@]}"
    fi
    if [[ $TYPE =~ imagenet_reg ]]; then
        echo "==> logistic regression of $KEY_NAME"
        launch_local "$PORT" evaluation/eval_logistic_regression.py --pretrained_weights "$PRETRAINED" \
            --avgpool_patchtokens "$AVGPOOL" --arch "$ARCH" --checkpoint_key "$KEY_NAME" --data_path data/imagenet "${EX[@]}"
    fi
    if [[ $TYPE =~ imagenet_linear_solo ]] && ! [[ $TYPE =~ pretrain ]]; then
        echo "==> linear probe (one lr) of $KEY_NAME"
        launch_local "$PORT" evaluation/eval_linear.py --pretrained_weights "$PRETRAINED" \
            --n_last_blocks "$LINEAR_N_LAST_BLOCKS" --avgpool_patchtokens "$LINEAR_AVGPOOL" --arch "$ARCH" \
            --checkpoint_key "$KEY_NAME" --output_dir "$OUTPUT_DIR/linear_solo" --data_path data/imagenet "${EX[@]}"
    elif [[ $TYPE =~ imagenet_linear ]]; then
        echo "==> linear probe (lr sweep) of $KEY_NAME"
        launch_local "$PORT" evaluation/eval_linear_multi.py --pretrained_weights "$PRETRAINED" \
            --n_last_blocks "$LINEAR_N_LAST_BLOCKS" --avgpool_patchtokens "$LINEAR_AVGPOOL" --arch "$ARCH" \
            --checkpoint_key "$KEY_NAME" --output_dir "$OUTPUT_DIR/linear" --data_path data/imagenet "${EX[@]}"
    fi
    if [[ $TYPE =~ imagenet_unsup_cls ]] && ! [[ $TYPE =~ pretrain ]]; then
        echo "==> unsupervised classification of $KEY_NAME"
        launch_local "$PORT" evaluation/unsupervised/unsup_cls.py --pretrained_weights "$PRETRAINED" --arch "$ARCH" \
            --checkpoint_key "$KEY_NAME" --data_path data/imagenet "${EX[@]}"
    fi
    # ADE20K (official: extract the backbone, train configs/{linear,upernet}/${ARCH}_512, test the final
    # checkpoint); SEG_PRESET picks another config (e.g. vit_base_640, or vit_small_512 for a vit_tiny run)
    SEG_RUNS=()
    if [[ $TYPE =~ ade20k_dense_linear ]] && ! [[ $TYPE =~ pretrain ]]; then SEG_RUNS+=(linear:seg_linear); fi
    if [[ $TYPE =~ ade20k_seg ]] && ! [[ $TYPE =~ pretrain ]]; then SEG_RUNS+=(upernet:seg); fi
    for SEG in ${SEG_RUNS[@]+"${SEG_RUNS[@]}"}; do
        SEG_HEAD=${SEG%%:*}; SEG_DIR=$OUTPUT_DIR/${SEG##*:}
        echo "==> ADE20K $SEG_HEAD segmentation of $KEY_NAME"
        mkdir -p "$SEG_DIR"
        SEG_WEIGHTS=${WEIGHT_FILE:-$OUTPUT_DIR/checkpoint_$KEY_NAME.pth}
        if [ -z "${WEIGHT_FILE:-}" ]; then
            "$PYTHON" extract_backbone_weights.py "$PRETRAINED" "$SEG_WEIGHTS" --checkpoint_key "$KEY_NAME"
        fi
        SEG_FLAGS=(--preset "$SEG_HEAD/${SEG_PRESET:-${ARCH}_512}" --arch "$ARCH" --pretrained_weights "$SEG_WEIGHTS"
                   --checkpoint_key state_dict --data_path "${ADE_DATA:-data/ade/ADEChallengeData2016}"
                   --output_dir "$SEG_DIR" --use_checkpoint true "${CPU_KNN[@]}")
        launch_local "$PORT" evaluation/semantic_segmentation/train.py "${SEG_FLAGS[@]}" "${EX[@]}"
        launch_local "$PORT" evaluation/semantic_segmentation/test.py "${SEG_FLAGS[@]}" \
            --checkpoint "$SEG_DIR/latest.pth" "${EX[@]}"
    done
    # COCO (official: extract the backbone, train the Cascade Mask R-CNN, test the final checkpoint)
    if [[ $TYPE =~ coco_det ]] && ! [[ $TYPE =~ pretrain ]]; then
        echo "==> COCO detection of $KEY_NAME"
        DET_WEIGHTS=${WEIGHT_FILE:-$OUTPUT_DIR/checkpoint_$KEY_NAME.pth}
        mkdir -p "$OUTPUT_DIR/det_$KEY_NAME"
        if [ -z "${WEIGHT_FILE:-}" ]; then
            "$PYTHON" extract_backbone_weights.py "$PRETRAINED" "$DET_WEIGHTS" --checkpoint_key "$KEY_NAME"
        fi
        DET_FLAGS=(--preset "${DET_PRESET:-${ARCH}_1x}" --arch "$ARCH" --pretrained_weights "$DET_WEIGHTS"
                   --checkpoint_key state_dict --data_path "${COCO_DATA:-data/coco}"
                   --output_dir "$OUTPUT_DIR/det_$KEY_NAME" --use_checkpoint true "${CPU_KNN[@]}")
        launch_local "$PORT" evaluation/object_detection/train.py "${DET_FLAGS[@]}" "${EX[@]}"
        launch_local "$PORT" evaluation/object_detection/test.py "${DET_FLAGS[@]}" \
            --checkpoint "$OUTPUT_DIR/det_$KEY_NAME/checkpoint.pth" "${EX[@]}"
    fi
    # retrieval, copy detection: one process, as officially (GPUS=0: the CPU)
    if [[ $TYPE =~ paris_oxford_reid ]]; then
        for DS in rparis6k roxford5k; do
            echo "==> image retrieval on $DS of $KEY_NAME"
            GPUS_PER_NODE=1 launch_local "$PORT" evaluation/eval_image_retrieval.py --avgpool_patchtokens "$AVGPOOL" \
                --arch "$ARCH" --pretrained_weights "$PRETRAINED" --checkpoint_key "$KEY_NAME" --imsize 512 \
                --multiscale 1 --data_path data/revisited_paris_oxford --dataset "$DS" \
                --output_dir "$OUTPUT_DIR/retrieval" "${CPU_KNN[@]}" "${EX[@]}"
        done
    fi
    if [[ $TYPE =~ copydays_copydet ]]; then
        echo "==> copy detection of $KEY_NAME"
        GPUS_PER_NODE=1 launch_local "$PORT" evaluation/eval_copy_detection.py --arch "$ARCH" \
            --pretrained_weights "$PRETRAINED" --checkpoint_key "$KEY_NAME" --data_path data/copydays \
            --output_dir "$OUTPUT_DIR/copydays" "${CPU_KNN[@]}" "${EX[@]}"
    fi
    # DAVIS: one plain process (official); J&F is computed by the script itself (no davis2017-evaluation clone)
    if [[ $TYPE =~ davis_viseg ]] && ! [[ $TYPE =~ pretrain ]]; then
        echo "==> DAVIS 2017 video segmentation of $KEY_NAME"
        "$PYTHON" evaluation/eval_video_segmentation.py --arch "$ARCH" --pretrained_weights "$PRETRAINED" \
            --checkpoint_key "$KEY_NAME" --data_path data/davis/DAVIS --output_dir "$OUTPUT_DIR/viseg/$KEY_NAME" \
            "${CPU_KNN[@]}" "${EX[@]}"
    fi
done

for TASK in imagenet_part_linear; do
    if [[ $TYPE =~ $TASK ]]; then
        echo "run.sh: TYPE $TASK is not provided by this repository (the official run.sh calls a script that" \
             "does not exist); run analysis/eval_linear_part.sh --topk K instead." >&2
        exit 2
    fi
done
