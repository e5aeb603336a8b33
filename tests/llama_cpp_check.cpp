// llama.cpp's view of a GGUF through its public API, for tests/test_llama_cpp.py, which builds this
// file against the static libraries of the cached llama.cpp build:
//
//   llama-check logits   MODEL.gguf ID [ID ...]   logits at every position, one line per position
//   llama-check generate MODEL.gguf N PROMPT      prompt ids, then greedy ids (llama.cpp's own tokenizer
//                                                 and greedy sampler; stops at end-of-generation tokens)
//
// f32 KV cache and no flash attention: llama.cpp's default f16 cache moves logits by a few 1e-3
// (4e-3 of ~12 on the quickstart model), enough to flip a near-tie; what is compared here is the model.
// Output goes through printf: llama.cpp's tools log asynchronously and can lose their last lines.
#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static llama_context * make_context(llama_model * model, int n_ctx) {
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n_ctx;
    cp.n_batch = n_ctx;
    cp.n_ubatch = n_ctx;
    cp.type_k = GGML_TYPE_F32;
    cp.type_v = GGML_TYPE_F32;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    return llama_init_from_model(model, cp);
}

static void print_ids(const std::vector<llama_token> & ids) {
    printf("[");
    for (size_t i = 0; i < ids.size(); i++) printf(i ? ", %d" : "%d", ids[i]);
    printf("]\n");
}

int main(int argc, char ** argv) {
    if (argc < 4 || (strcmp(argv[1], "logits") && strcmp(argv[1], "generate"))) {
        fprintf(stderr, "usage: %s logits MODEL ID... | generate MODEL N PROMPT\n", argv[0]);
        return 2;
    }
    llama_backend_init();
    llama_log_set([](ggml_log_level, const char *, void *) {}, nullptr);
    llama_model * model = llama_model_load_from_file(argv[2], llama_model_default_params());
    if (!model) {
        fprintf(stderr, "cannot load %s\n", argv[2]);
        return 1;
    }
    const llama_vocab * vocab = llama_model_get_vocab(model);

    if (!strcmp(argv[1], "logits")) {
        std::vector<llama_token> ids;
        for (int i = 3; i < argc; i++) ids.push_back(atoi(argv[i]));
        llama_context * ctx = make_context(model, ids.size());
        llama_batch batch = llama_batch_init(ids.size(), 0, 1);
        for (size_t i = 0; i < ids.size(); i++) {
            batch.token[i] = ids[i];
            batch.pos[i] = i;
            batch.n_seq_id[i] = 1;
            batch.seq_id[i][0] = 0;
            batch.logits[i] = 1;
        }
        batch.n_tokens = ids.size();
        if (llama_decode(ctx, batch)) return 1;
        const int n_vocab = llama_vocab_n_tokens(vocab);
        for (size_t i = 0; i < ids.size(); i++) {
            const float * l = llama_get_logits_ith(ctx, i);
            for (int v = 0; v < n_vocab; v++) printf(v ? " %.9g" : "%.9g", l[v]);
            printf("\n");
        }
        llama_batch_free(batch);
        llama_free(ctx);
    } else {
        const int n_predict = atoi(argv[3]);
        const std::string prompt = argc > 4 ? argv[4] : "";
        // add_special: BOS only if the model asks for it; parse_special: "<|im_end|>" is one token
        const int n_prompt = -llama_tokenize(vocab, prompt.c_str(), prompt.size(), nullptr, 0, true, true);
        std::vector<llama_token> ids(n_prompt);
        if (llama_tokenize(vocab, prompt.c_str(), prompt.size(), ids.data(), ids.size(), true, true) < 0) return 1;
        print_ids(ids);
        llama_context * ctx = make_context(model, n_prompt + n_predict);
        llama_sampler * smpl = llama_sampler_chain_init(llama_sampler_chain_default_params());
        llama_sampler_chain_add(smpl, llama_sampler_init_greedy());
        std::vector<llama_token> out;
        llama_batch batch = llama_batch_get_one(ids.data(), ids.size());
        llama_token next;
        for (int i = 0; i < n_predict; i++) {
            if (llama_decode(ctx, batch)) return 1;
            next = llama_sampler_sample(smpl, ctx, -1);
            out.push_back(next);
            if (llama_vocab_is_eog(vocab, next)) break;
            batch = llama_batch_get_one(&next, 1);
        }
        print_ids(out);
        llama_sampler_free(smpl);
        llama_free(ctx);
    }
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
