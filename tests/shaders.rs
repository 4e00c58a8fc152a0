//! Every kernel parses and validates with naga, exactly as the GPU backend composes
//! it (shared preludes and the loader of each input element type included). Needs
//! no GPU.

use microclip::shaders::KernelVariant;
use microclip::Dtype::F16;

#[test]
fn every_kernel_validates_with_naga() {
    let names: Vec<&str> = microclip::shaders::kernel_names().collect();
    // Every kernel file under shaders/ (all but the shared preludes) is listed.
    let mut files: Vec<String> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/shaders"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter_map(|f| f.strip_suffix(".wgsl").map(String::from))
        .filter(|f| {
            !["common", "column_mean", "tensor_table"].contains(&f.as_str())
                && !f.starts_with("grads_")
        })
        .collect();
    files.sort();
    let mut listed: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    listed.sort();
    assert_eq!(listed, files);
    for kernel in kernels() {
        let (module, _) = validated(kernel);
        let name = kernel.0;
        assert!(
            module.entry_points.iter().any(|e| e.name == "main"),
            "{name}: no main"
        );
        // Every pipeline constant the backend sets is an override of the kernel.
        for small in [false, true] {
            let all_partials = microclip::shaders::PartialsVariant {
                deep: true,
                aligned: true,
                no_carry: true,
                stores_means: Some(true),
            };
            let partials = match name {
                "mb_partials" => microclip::shaders::partials_constants(small, all_partials),
                "weighted_means" => {
                    microclip::shaders::weighted_means_constants(small, true, true, true)
                }
                _ => Vec::new(),
            };
            let constants = [
                microclip::shaders::kernel_constants(name, small),
                microclip::shaders::deep_kernel_constants(name, small),
                &partials,
                microclip::shaders::row_chunks_kernel_constants(name, small),
            ];
            for (key, _) in constants.into_iter().flatten() {
                assert!(
                    module
                        .overrides
                        .iter()
                        .any(|(_, o)| o.name.as_deref() == Some(*key)),
                    "{name}: no override {key}"
                );
            }
        }
    }
}

#[test]
fn every_wgsl_file_is_used() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/shaders");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let stem = path.file_stem().unwrap().to_str().unwrap().to_string();
        if stem == "common" && cfg!(feature = "emulate-ftz-division") {
            // That feature rewrites fdiv's body in it (checked in src/gpu/kernels.rs).
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let used = kernels().any(|k| source(k).contains(&text));
        assert!(used, "{stem}.wgsl is not part of any kernel");
    }
}

/// Every float division (or remainder) of every kernel, for every input element
/// type, is in common.wgsl's `fdiv` (which the feature `emulate-ftz-division`
/// swaps for NVIDIA's flushing division), and only `div_wide` calls `fdiv`: no
/// kernel divides by a number beyond 2^126 through a flushed reciprocal.
#[test]
fn float_division_only_in_fdiv() {
    use naga::{BinaryOperator, Expression, ScalarKind};
    for kernel in kernels() {
        let (module, info) = validated(kernel);
        let (name, dtype, _) = kernel;
        let fdiv = module
            .functions
            .iter()
            .find(|(_, f)| f.name.as_deref() == Some("fdiv"))
            .map(|(h, _)| h);
        let functions = module.functions.iter().map(|(h, f)| (f, &info[h])).chain(
            module
                .entry_points
                .iter()
                .enumerate()
                .map(|(i, e)| (&e.function, info.get_entry_point(i))),
        );
        for (function, function_info) in functions {
            let fname = function.name.as_deref().unwrap_or("?");
            for (_, expr) in function.expressions.iter() {
                if let Expression::Binary {
                    op: BinaryOperator::Divide | BinaryOperator::Modulo,
                    left,
                    ..
                } = *expr
                {
                    let kind = function_info[left]
                        .ty
                        .inner_with(&module.types)
                        .scalar_kind();
                    assert!(
                        kind != Some(ScalarKind::Float) || fname == "fdiv",
                        "{name} ({dtype}): float division in {fname}"
                    );
                }
            }
            let mut callees = Vec::new();
            calls(&function.body, &mut callees);
            assert!(
                fname == "div_wide" || fdiv.is_none_or(|f| !callees.contains(&f)),
                "{name}: {fname} calls fdiv, not div_wide"
            );
        }
    }
}

/// The functions called anywhere in `block`.
fn calls(block: &naga::Block, out: &mut Vec<naga::Handle<naga::Function>>) {
    use naga::Statement;
    for statement in block.iter() {
        match statement {
            Statement::Call { function, .. } => out.push(*function),
            Statement::Block(inner) => calls(inner, out),
            Statement::If { accept, reject, .. } => {
                calls(accept, out);
                calls(reject, out);
            }
            Statement::Loop {
                body, continuing, ..
            } => {
                calls(body, out);
                calls(continuing, out);
            }
            Statement::Switch { cases, .. } => cases.iter().for_each(|c| calls(&c.body, out)),
            _ => {}
        }
    }
}

/// A kernel as the GPU backend composes it: name, input element type, and
/// variant (rows of several buffers per dispatch; f16 by `unpack2x16float`;
/// 16-bit rows bound as octs).
type Kernel = (&'static str, microclip::Dtype, KernelVariant);

/// Every kernel source the GPU backend composes: each kernel for each input
/// element type, the slots variants of the input readers, their octs variants
/// for 16-bit input, and the f16 readers decoding with `unpack2x16float`
/// (`f16_unpack` changes no other source).
fn kernels() -> impl Iterator<Item = Kernel> {
    microclip::shaders::kernel_names().flat_map(|n| {
        microclip::Dtype::ALL.into_iter().flat_map(move |d| {
            let reader = microclip::shaders::kernel_source_with_slots(n, d).is_some();
            let unpack = [false, true]
                .into_iter()
                .filter(move |&u| !u || reader && d == F16);
            unpack.flat_map(move |f16_unpack| {
                // One binding, slots (readers), octs (16-bit readers).
                let ways = [(false, false), (true, false), (false, true)];
                let ways = ways.into_iter().filter(move |&(slots, octs)| {
                    (!slots || reader) && (!octs || reader && d != microclip::Dtype::F32)
                });
                ways.map(move |(slots, octs)| {
                    let variant = KernelVariant {
                        slots,
                        f16_unpack,
                        octs,
                    };
                    (n, d, variant)
                })
            })
        })
    })
}

fn source((name, dtype, variant): Kernel) -> String {
    microclip::shaders::kernel_source_variant(name, dtype, variant).unwrap()
}

/// The f16 readers call `unpack2x16float` exactly in their `f16_unpack`
/// variant, which naga rejects without `SHADER_FLOAT16_IN_FLOAT32` (the
/// capability wgpu derives from the adapter): the variant is what the device
/// probe decides on, and the default sources need no capability.
#[test]
fn only_the_f16_unpack_variant_calls_the_builtin() {
    use naga::valid::{Capabilities, ValidationFlags, Validator};
    for kernel @ (name, dtype, variant) in kernels() {
        let source = source(kernel);
        let calls = source.contains("unpack2x16float(");
        assert_eq!(calls, variant.f16_unpack, "{name} {dtype} {variant:?}");
        if calls {
            let module = naga::front::wgsl::parse_str(&source).unwrap();
            let bare =
                Validator::new(ValidationFlags::all(), Capabilities::empty()).validate(&module);
            assert!(
                bare.is_err(),
                "{name} {dtype} {variant:?} validates without the capability"
            );
        }
    }
}

/// A kernel parsed and validated by naga (a panic names the kernel and the
/// error): with no capabilities, but `SHADER_FLOAT16_IN_FLOAT32` for the
/// `unpack2x16float` variant (what wgpu checks against the adapter).
fn validated(kernel: Kernel) -> (naga::Module, naga::valid::ModuleInfo) {
    use naga::valid::Capabilities;
    let source = source(kernel);
    let (name, dtype, variant) = kernel;
    let module = naga::front::wgsl::parse_str(&source)
        .unwrap_or_else(|e| panic!("{name} {dtype} {variant:?}: {}", e.emit_to_string(&source)));
    let capabilities = match variant.f16_unpack {
        true => Capabilities::SHADER_FLOAT16_IN_FLOAT32,
        false => Capabilities::empty(),
    };
    let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), capabilities)
        .validate(&module)
        .unwrap_or_else(|e| panic!("{name} {dtype} {variant:?}: {e:?}"));
    (module, info)
}
