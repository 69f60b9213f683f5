"""Running a transformers model out of the tiered store. The folders show the flow, front -> compose -> place ->
run, on top of loading:

front/      what users call: cli.py (one library function per command), generate.py (a request's prompts to
            text), batchfile.py (a JSONL file, resumable), batcher.py (continuous batching; kv_rows.py: its ragged
            KV cache's row surgery), server.py (the OpenAI-compatible API and `serve`), launch.py (--tp ranks),
            quality.py (`eval`: what a compression format costs in accuracy), text.py (prompts that are not UTF-8
            refused)
compose.py  the one place a model is opened: resolve -> units -> shard -> draft -> place -> stores -> adapters ->
            decoding/model.TierstoreModel, everything opened on one ExitStack that `close()` closes; also
            `make_plan_for` (`tierstore plan`: the same steps up to the plan, no weights read), `convert_model`
placement/  how the device and RAM budgets are divided: budgets.py (budgets capped to the machine, the device
            reserve, a draft's cost, the planner's input), plan.py (units -> policies/planner.py's plan, dense or
            MoE, with the reserve for dequantization and a draft), kv.py (the KV cache's share: device reserve or
            host RAM, re-plans as it grows, the largest batch), prefill.py (a long prompt's chunks and their room)
runtime/    what runs each pass. Module adapters (adapters.py: made = attached, `detach()` restores; hooks.py
            lends each unit's tensors around its module's forward, lookup.py answers the input embedding from
            RAM, experts.py runs MoE layers on the routed experts' device slots, or on the CPU (host_experts.py)
            or read in place from mapped RAM (mapped_experts.py), collectives.py combines tensor-parallel ranks'
            outputs); the KV cache: host_cache.py (in host RAM), reserved_cache.py (on the device,
            written in place), prefix_cache.py (finished sequences' caches kept for reuse); chunk_attention.py
            (a prompt chunk's attention without a mask tensor)
decoding/   the decode loops: model.py (TierstoreModel: transformers' generate, timing, report, KV placement),
            graphed.py (decode steps replayed from a CUDA graph: a resident model, or experts read in place),
            speculation.py (a draft's tree verified in one pass; drafts.py, tree.py), prefill.py (a prompt fed in
            chunks, for generate and the batcher), and under all three loops (generate, speculation, the batcher)
            sampling.py;
            importance.py (a calibration text's importance matrix, for calibrated compression)
loading/    from what the user names to units: resolve.py, checkpoint.py, safetensors_header.py, skeleton.py (the
            meta model cut into units: architecture knowledge lives here), sources.py (`open_units`: safetensors
            read in place or a layer store), convert.py (GGUF, .bin, renamed safetensors -> a layer store;
            gguf_packed.py: a GGUF's matrices kept in their block formats),
            layerstore.py (the store's format and reader) beside store_writer.py (its writer), cache.py (the
            cache's stores listed and removed), splits.py (how tensor parallelism cuts each tensor) beside
            shards.py (a rank's shards served and stored)
devices.py  leaf helpers: the compute device and dtypes
"""
