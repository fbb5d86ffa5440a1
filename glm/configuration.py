"""GLM configuration: the fields of a THUDM / PaddleNLP GLM `config.json`."""

from paddlenlp.transformers import PretrainedConfig
from paddlenlp.transformers.glm.configuration import GLM_PRETRAINED_INIT_CONFIGURATION

__all__ = ["GLMConfig", "BUILTIN_CHECKPOINTS"]

# PaddleNLP's own GLM checkpoints, downloadable by name (where the network allows).
BUILTIN_CHECKPOINTS = tuple(GLM_PRETRAINED_INIT_CONFIGURATION)


class GLMConfig(PretrainedConfig):
    """Configuration of a GLM model (blank-infilling transformer with 2-D positions).

    Field names follow the `config.json` of THUDM/glm-large-chinese and glm-10b-chinese as PaddleNLP
    ships them, so those files load unchanged and what we save loads in PaddleNLP.

    Fields beyond PaddleNLP's:
      label_smoothing: THUDM's `(1-eps)*CE + eps*mean_vocab(-log_softmax)`, applied by the model's loss.
      use_flash_attention: route attention through `F.scaled_dot_product_attention` (fused kernels on GPU).
    Fields kept for file compatibility but unused (GLM-chinese never sets them): checkpoint_num_layers,
    parallel_output, relative_encoding, spell_length, spell_func, pool_token,
    use_scaled_init_for_output_weights, output_predict (the LM head always predicts).
    """

    model_type = "glm"
    pretrained_init_configuration = GLM_PRETRAINED_INIT_CONFIGURATION
    attribute_map = {"num_hidden_layers": "num_layers", "torch_dtype": "dtype"}

    def __init__(
        self,
        num_layers=24,
        vocab_size=30592,
        hidden_size=1024,
        num_attention_heads=16,
        embedding_dropout_prob=0.1,
        attention_dropout_prob=0.1,
        output_dropout_prob=0.1,
        max_sequence_length=512,
        checkpoint_num_layers=1,
        parallel_output=True,
        relative_encoding=False,
        block_position_encoding=True,
        output_predict=True,
        spell_length=None,
        spell_func="lstm",
        attention_scale=1.0,
        initializer_range=0.02,
        pool_token="cls",
        layernorm_epsilon=1e-5,
        use_scaled_init_for_output_weights=False,
        label_smoothing=0.0,
        use_flash_attention=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_layers = num_layers
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.embedding_dropout_prob = embedding_dropout_prob
        self.attention_dropout_prob = attention_dropout_prob
        self.output_dropout_prob = output_dropout_prob
        self.max_sequence_length = max_sequence_length
        self.checkpoint_num_layers = checkpoint_num_layers
        self.parallel_output = parallel_output
        self.relative_encoding = relative_encoding
        self.block_position_encoding = block_position_encoding
        self.output_predict = output_predict
        self.spell_length = spell_length
        self.spell_func = spell_func
        self.attention_scale = attention_scale
        self.initializer_range = initializer_range
        self.pool_token = pool_token
        self.layernorm_epsilon = layernorm_epsilon
        self.use_scaled_init_for_output_weights = use_scaled_init_for_output_weights
        self.label_smoothing = label_smoothing
        self.use_flash_attention = use_flash_attention
        if hidden_size % num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be a multiple of num_attention_heads ({num_attention_heads})"
            )
        if relative_encoding:
            raise ValueError("relative_encoding=True (Transformer-XL style GLM) is not supported; no GLM-chinese checkpoint uses it")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
