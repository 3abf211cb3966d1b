use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Conv2dConfig, Module, VarBuilder, VarMap};
use std::time::Instant;
fn main() {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let conv = candle_nn::conv2d(32, 32, 3, Conv2dConfig { padding: 1, ..Default::default() }, vb.pp("c")).unwrap();
    let x = Tensor::rand(0f32, 1f32, (16, 32, 64, 64), &dev).unwrap();
    let xv = Var::from_tensor(&x).unwrap();
    for _ in 0..2 {
        let t0 = Instant::now();
        let y = conv.forward(&x).unwrap();
        println!("candle conv fwd {:?}", t0.elapsed());
        let t0 = Instant::now();
        let y2 = conv.forward(xv.as_tensor()).unwrap();
        let g = y2.sum_all().unwrap().backward().unwrap();
        println!("candle conv fwd+bwd {:?}", t0.elapsed());
        let _ = (y, g);
        // gemm way
        let t0 = Instant::now();
        let xp = xv.as_tensor().pad_with_zeros(2, 1, 1).unwrap().pad_with_zeros(3, 1, 1).unwrap();
        println!(" pad {:?}", t0.elapsed());
        let mut taps = vec![];
        for ky in 0..3 { for kx in 0..3 { taps.push(xp.narrow(2, ky, 64).unwrap().narrow(3, kx, 64).unwrap()); } }
        let cols = Tensor::cat(&taps, 1).unwrap().reshape((16, 288, 4096)).unwrap();
        println!(" cols {:?}", t0.elapsed());
        let w = conv.weight().permute((0, 2, 3, 1)).unwrap().reshape((32, 288)).unwrap();
        let y3 = w.broadcast_matmul(&cols).unwrap();
        println!(" mm {:?}", t0.elapsed());
        let loss = y3.sum_all().unwrap();
        let t1 = Instant::now();
        let g = loss.backward().unwrap();
        println!(" bwd {:?} total {:?}", t1.elapsed(), t0.elapsed());
        let _ = g;
        let gn = candle_nn::group_norm(32, 32, 1e-6, vb.pp("g")).unwrap();
        let t0 = Instant::now();
        let y = gn.forward(xv.as_tensor()).unwrap();
        let y = (&y * candle_nn::ops::sigmoid(&y).unwrap()).unwrap();
        println!(" gn fwd {:?}", t0.elapsed());
        y.sum_all().unwrap().backward().unwrap();
        println!(" gn fwd+bwd {:?}", t0.elapsed());
    }
}
